"""Config loading and validation: a bad file names file, line and problem."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import MITMDUMP, ROOT, free_port

from addon import config
from addon.windows import Window


def test_bundled_default_reproduces_the_complimentary_program():
    cfg = config.load()
    assert cfg.path == config.DEFAULT_CONFIG
    assert cfg.timezone_name == "UTC" and cfg.default_pool == "premium"
    assert cfg.pools["premium"].limit == 1_000_000 and cfg.pools["mini"].limit == 10_000_000
    assert cfg.pools["other"].limit is None  # track only
    assert all(p.window == Window("day") for p in cfg.pools.values())
    assert "gpt-4o" in cfg.pools["premium"].models and "gpt-4o-mini" in cfg.pools["mini"].models


def test_full_config():
    cfg = config.parse(
        """
timezone = "Europe/Paris"
default_pool = "b"
estimate_output_tokens = 256

[alerts]
thresholds = [50, 90]
webhook = "https://hooks.example/x"

[pools.a]
limit = 100
window = "rolling:24h"
models = ["gpt-4o"]
alerts = [75]
fail = "open"

[pools.b]
window = "week"
models = ["*"]

[keys.0123456789ab]
label = "alice"
limits = { a = 10 }

[prices."gpt-4o"]
input = 2.5
output = 10
cached_input = 1.25
""",
        "x.toml",
    )
    assert cfg.timezone_name == "Europe/Paris" and cfg.default_pool == "b" and cfg.estimate_output_tokens == 256
    a, b = cfg.pools["a"], cfg.pools["b"]
    assert (a.limit, a.window.rolling_hours, a.thresholds, a.fail) == (100, 24, (75.0,), "open")
    assert (b.limit, b.window.kind, b.thresholds, b.fail) == (None, "week", (50.0, 90.0), "open")
    assert cfg.pools["a"].models == ("gpt-4o",)
    assert cfg.keys["0123456789ab"].label == "alice" and cfg.keys["0123456789ab"].limits == {"a": 10}
    assert cfg.prices["gpt-4o"] == config.Price(2.5, 10.0, 1.25)
    assert cfg.webhook == "https://hooks.example/x"


def test_limited_pools_fail_closed_by_default():
    cfg = config.parse('[pools.a]\nlimit = 5\nmodels = ["x"]\n')
    assert cfg.pools["a"].fail == "closed" and cfg.default_pool == "a"


BAD = [
    ('timezone = "UTC"\n[pools.a\nmodels = []\n', 2, "invalid TOML"),
    ('timezone = "Mars/Base"\n[pools.a]\nmodels = []\n', 1, "unknown timezone"),
    ('colour = 1\n[pools.a]\nmodels = []\n', 1, "unknown setting 'colour'"),
    ('timezone = "UTC"\n', None, "at least one [pools.NAME]"),
    ('default_pool = "zzz"\n[pools.a]\nmodels = []\n', 1, "default_pool 'zzz' is not a pool"),
    ('\n[pools.a]\nlimit = -5\nmodels = ["x"]\n', 3, "pools.a.limit must be a whole number"),
    ('\n[pools.a]\nlimit = "lots"\n', 3, "pools.a.limit"),
    ('\n[pools.a]\nmodels = []\n\n[pools.b]\nwindow = "fortnight"\n', 6, "window must be one of"),
    ('\n[pools.a]\nwindow = "rolling:0h"\n', 3, "window"),
    ('\n[pools.a]\nmodels = "gpt-4o"\n', 3, "models must be a list"),
    ('\n[pools.a]\nmodel = ["gpt-4o"]\n', 3, "unknown setting 'model' in [pools.a]"),
    ('\n[pools.a]\nfail = "maybe"\n', 3, "fail must be"),
    ('\n[pools.a]\nalerts = [0]\n', 3, "thresholds"),
    ('[alerts]\nwebhook = "ftp://x"\n[pools.a]\n', 2, "webhook must be an http(s) URL"),
    ('[pools.a]\nmodels = []\n[keys.abc]\nlimits = { nope = 5 }\n', 4, "unknown pool 'nope'"),
    ('[pools.a]\nmodels = []\n[keys.abc]\nlabel = 5\n', 4, "label must be a string"),
    ('[pools.a]\nmodels = []\n[prices."gpt-4o"]\nvoice = 1\n', 3, "unknown setting 'voice'"),
    ('[pools.a]\nmodels = []\n[prices."gpt-4o"]\n', 3, "sets no price"),
    ('[pools.a]\nmodels = []\n[prices."gpt-4o".priority]\ninput = "x"\n', 4, "priority.input must be a number"),
    ('[pools.a]\nmodels = []\n[prices."gpt-4o"]\ninput = 1\noutput = -2\n', 5, "output must be a number"),
    ('estimate_output_tokens = -1\n[pools.a]\n', 1, "estimate_output_tokens"),
]


@pytest.mark.parametrize("text, line, problem", BAD)
def test_bad_config_names_file_line_and_problem(tmp_path, text, line, problem):
    path = tmp_path / "pools.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    message = str(info.value)
    where = f"{path}:{line}: " if line else f"{path}: "
    assert message.startswith(where), message
    assert problem in message


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'timezone = "\xe9"\n')
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        config.load(path)


def test_window_bounds():
    from zoneinfo import ZoneInfo

    now = datetime(2026, 3, 29, 12, 0, tzinfo=timezone.utc)  # a Sunday, DST day in Paris
    paris = ZoneInfo("Europe/Paris")
    start, end = Window("day").bounds(now, paris)
    assert (start.isoformat(), end.isoformat()) == ("2026-03-28T23:00:00+00:00", "2026-03-29T22:00:00+00:00")
    start, end = Window("week").bounds(now, ZoneInfo("UTC"))
    assert (start.date().isoformat(), end.date().isoformat()) == ("2026-03-23", "2026-03-30")
    start, end = Window("month").bounds(now, ZoneInfo("UTC"))
    assert (start.date().isoformat(), end.date().isoformat()) == ("2026-03-01", "2026-04-01")
    start, end = Window.parse("rolling:24h").bounds(now, paris)
    assert (end - start).total_seconds() == 86400 and end == now


def test_mitmdump_refuses_to_start_with_a_bad_config(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('timezone = "UTC"\n\n[pools.premium]\nlimit = "a lot"\nmodels = ["gpt-4o"]\n')
    db = tmp_path / "usage.db"
    proc = subprocess.run(
        [MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", str(free_port()), "--set", f"confdir={tmp_path}",
         "-s", str(ROOT / "addon" / "usage.py"), "--set", f"usage_config={bad}", "--set", f"usage_db={db}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert f"{bad}:4: pools.premium.limit must be a whole number" in output
    # Nothing half-applied: no database was opened for this configuration.
    assert not db.exists()


def test_iso_utc_and_local_day():
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    from addon.windows import iso_utc, local_day

    instant = datetime(2026, 11, 22, 23, 25, 0, 123999, tzinfo=timezone(timedelta(hours=-2)))
    assert iso_utc(instant) == "2026-11-23T01:25:00.123Z"
    assert iso_utc(datetime(2026, 1, 1, tzinfo=timezone.utc)) == "2026-01-01T00:00:00.000Z"
    assert local_day(instant, ZoneInfo("UTC")) == "2026-11-23"
    assert local_day(instant, ZoneInfo("America/Sao_Paulo")) == "2026-11-22"


def test_issued_keys_settings_are_validated_with_the_rest(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[pools.a]\nmodels = []\n\n[issued_keys]\nenabled = true\nprefix = "sk-team-"\n')
    settings = config.load(path).issued_keys
    assert settings == config.IssuedKeysSettings(enabled=True, prefix="sk-team-")
    path.write_text('[pools.a]\nmodels = []\n\n[issued_keys]\nrequire = "yes"\n')
    with pytest.raises(config.ConfigError, match=r"c\.toml(:\d+)?: \[issued_keys\]: require must be true or false"):
        config.load(path)
    assert config.load(ROOT / "addon" / "default-config.toml").issued_keys == config.IssuedKeysSettings()


def test_the_addons_share_one_load_per_change_of_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[pools.a]\nmodels = ["gpt-4o"]\nlimit = 100\n')
    first = config.load_shared(path)
    assert config.load_shared(str(path)) is first  # a second addon on the same reload
    path.write_text('[pools.a]\nmodels = ["gpt-4o"]\nlimit = 2000\n')
    changed = config.load_shared(path)
    assert changed is not first and changed.pools["a"].limit == 2000
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load_shared(tmp_path / "missing.toml")
