"""One truth for "used in the window": every reader of pool status agrees on one database.

The proxy's ledger (its status and its admission counters), `python -m addon
status`, `top`, the Datasette status API (a real `datasette serve` with the
package's plugin) and the old HTTP API are compared on one database with a
calendar pool in a non-UTC time zone, a rolling pool, a track-only pool, a
key with its own limit, resets of a pool and of a key, and live and expired
reservations. Then the forecast (`exhausted_at`) with an injected clock.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import ROOT
from test_datasette_helpers import Datasette

from addon import config as config_mod
from addon.datasette.plugin import register_functions
from addon.ledger import pool_status
from addon.ledger.policy import Check
from addon.ledger.published import write_pools
from addon.ledger.sqlite_ledger import Ledger
from addon.store import schema
from addon.tools import top
from addon.windows import iso_utc

KEY = "abc123def456"
CONFIG = f"""
timezone = "Europe/Paris"
default_pool = "premium"

[pools.premium]
limit = 5_000
window = "day"
models = ["gpt-4o"]

[pools.mini]
limit = 2_000
window = "rolling:2h"
models = ["gpt-4o-mini"]

[pools.other]
window = "month"
models = ["text-embedding-*"]

[keys.{KEY}]
label = "alice"
limits = {{ premium = 1_500, mini = 800 }}
"""


def add_row(conn, at: datetime, pool: str, tokens: int | None, key: str | None = None) -> None:
    conn.execute("INSERT INTO requests (ts, day, pool, model, outcome, total_tokens, key_id) VALUES (?,?,?,?,?,?,?)",
                 (iso_utc(at), at.date().isoformat(), pool, "m", "ok", tokens, key))


def build(tmp_path: Path, now: datetime) -> tuple[Path, config_mod.Config]:
    path = tmp_path / "usage.db"
    config = config_mod.parse(CONFIG, tmp_path / "config.toml")
    db = schema.connect(path)
    schema.migrate(db)
    write_pools(db, config, now)
    conn = db.conn
    with conn:
        # premium: since local midnight (Paris), after a pool reset 40 minutes ago
        add_row(conn, now - timedelta(hours=30), "premium", 9_999)  # yesterday
        add_row(conn, now - timedelta(minutes=50), "premium", 700)  # before the reset
        add_row(conn, now - timedelta(minutes=50), "premium", 300, KEY)  # before the reset
        add_row(conn, now - timedelta(minutes=30), "premium", 400)
        add_row(conn, now - timedelta(minutes=25), "premium", 250, KEY)  # before the key's reset
        add_row(conn, now - timedelta(minutes=10), "premium", 600, KEY)
        add_row(conn, now - timedelta(minutes=5), "premium", None)  # an error: no usage
        # mini: rolling 2 h
        add_row(conn, now - timedelta(hours=3), "mini", 1_000)  # aged out
        add_row(conn, now - timedelta(minutes=100), "mini", 300, KEY)
        add_row(conn, now - timedelta(minutes=20), "mini", 500)
        # other: track only, this month
        add_row(conn, now - timedelta(minutes=1), "other", 7)
        for at, pool, key in ((now - timedelta(minutes=40), "premium", None),
                              (now - timedelta(minutes=15), "premium", KEY),
                              (now + timedelta(minutes=30), "mini", None)):  # a future stamp: not yet
            conn.execute("INSERT INTO resets (ts, pool, key_id, note) VALUES (?, ?, ?, 'test')",
                         (iso_utc(at), pool, key))
        clock = time.time()
        for pool, key, tokens, expires in (("premium", None, 120, clock + 300), ("premium", KEY, 80, clock + 300),
                                           ("mini", None, 999, clock - 5)):  # expired
            conn.execute("INSERT INTO reservations (pool, key_id, tokens, created, expires, owner) VALUES "
                         "(?, ?, ?, ?, ?, 'someone#1')", (pool, key, tokens, clock, expires))
    conn.close()
    return path, config


TIMES = ("window_start", "resets_at", "exhausted_at")
EXACT = ("limit", "used", "reserved", "remaining", "percentage", "pace_per_hour", "window")


def same(a: list[dict], b: list[dict], what: str) -> None:
    """Equal figures; times within a few seconds (readers run a moment apart, a rolling window moves)."""
    key = lambda r: (r["pool"], r["key_id"] or "")  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert [key(r) for r in a] == [key(r) for r in b], what
    for x, y in zip(a, b, strict=True):
        for field in EXACT:
            assert x[field] == y[field], (what, key(x), field, x[field], y[field])
        for field in TIMES:
            if x[field] is None or y[field] is None:
                assert x[field] == y[field], (what, key(x), field)
            else:
                gap = abs(datetime.fromisoformat(x[field]) - datetime.fromisoformat(y[field]))
                assert gap < timedelta(seconds=10), (what, key(x), field, x[field], y[field])


def test_every_reader_agrees(tmp_path):
    now = datetime.now(timezone.utc)
    path, config = build(tmp_path, now)

    ledger = Ledger(path, config)
    try:
        from_ledger = [pool_status.as_row(s) for s in ledger.status()]
        # Admission counts the same: a refusal reports what it counted.
        pools = config.pools
        for pool, limit, key in (("premium", 5_000, None), ("premium", 1_500, KEY), ("mini", 2_000, None),
                                 ("mini", 800, KEY)):
            decision = ledger.admit([Check(pools[pool], limit, key)], 10**9)
            row = next(r for r in from_ledger if r["pool"] == pool and r["key_id"] == key)
            assert not decision.admitted and decision.used == row["used"], (pool, key)
            gap = abs(decision.window_start - datetime.fromisoformat(row["window_start"]))
            assert gap < timedelta(seconds=10)  # a rolling window moves on meanwhile
    finally:
        ledger.close()

    cli = subprocess.run([sys.executable, "-m", "addon", "status", "--db", str(path), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    from_cli = json.loads(cli.stdout)

    reader = top.Reader(path, None)
    from_top = [pool_status.as_row(s) for s in reader.snapshot(5, 0).pools]
    reader.conn.close()

    ds = Datasette(path, tmp_path / "datasette.log")
    try:
        pools_api = ds.json("/usage/status.json?_shape=array")
        keys_api = ds.json("/usage/key_status.json?_shape=array")
        old_api = ds.json("/api/usage")
    finally:
        ds.stop()
    from_datasette = [{**r, "key_id": None, "label": None} for r in pools_api] + keys_api

    # What it should be, by hand:
    figures = {(r["pool"], r["key_id"]): r for r in from_ledger}
    assert figures[("premium", None)]["used"] == 400 + 250 + 600
    assert figures[("premium", None)]["reserved"] == 200
    assert figures[("premium", None)]["remaining"] == 5_000 - 1_250 - 200
    assert figures[("premium", KEY)]["used"] == 600  # after the key's own reset
    assert figures[("premium", KEY)]["label"] == "alice"
    assert figures[("mini", None)]["used"] == 800 and figures[("mini", None)]["reserved"] == 0
    assert figures[("mini", KEY)]["used"] == 300
    assert figures[("other", None)]["used"] == 7 and figures[("other", None)]["remaining"] is None
    assert figures[("premium", None)]["window_start"] == iso_utc(now - timedelta(minutes=40))
    assert figures[("mini", None)]["resets_at"] == iso_utc(now - timedelta(minutes=100) + timedelta(hours=2))

    same(from_ledger, from_cli, "status CLI")
    same(from_ledger, from_top, "top")
    same(from_ledger, from_datasette, "Datasette status API")
    for row in from_ledger:
        if row["key_id"] is None:
            old = old_api[row["pool"]]
            assert (old["tokens_used"], old["limit"], old["percentage"]) == (row["used"], row["limit"],
                                                                              row["percentage"])
    # --config overrides what was published (here: a bigger premium limit, no keys).
    override = tmp_path / "override.toml"
    override.write_text(CONFIG.split("[keys.")[0].replace("limit = 5_000", "limit = 9_000"))
    cli = subprocess.run([sys.executable, "-m", "addon", "status", "--db", str(path), "--json", "--config",
                          str(override)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    rows = {(r["pool"], r["key_id"]): r for r in json.loads(cli.stdout)}
    # (and the implicit track-only pool that batches count in)
    assert set(rows) == {("premium", None), ("mini", None), ("other", None), ("batch", None)}
    assert rows[("premium", None)]["limit"] == 9_000 and rows[("premium", None)]["used"] == 1_250


def _at(now: datetime, rows: list[tuple[timedelta, int]], tmp_path: Path, limit: int = 5_000) -> Path:
    path = tmp_path / "forecast.db"
    config = config_mod.parse(f'[pools.p]\nlimit = {limit}\nwindow = "day"\nmodels = ["gpt-4o"]\n')
    db = schema.connect(path)
    schema.migrate(db)
    write_pools(db, config, now)
    with db.conn:
        db.conn.execute("DELETE FROM requests")
        for ago, tokens in rows:
            add_row(db.conn, now - ago, "p", tokens)
    db.conn.close()
    return path


@pytest.mark.parametrize("clock, rows, expected", [
    # 10:00 UTC, 1,500 used, 500 of them in the last hour: 3,500 left last 7 h -> 17:00, before midnight.
    ("2026-11-30T10:00:00", [(timedelta(hours=3), 1_000), (timedelta(minutes=50), 200), (timedelta(minutes=30), 300)],
     "2026-11-30T17:00:00.000Z"),
    # 20:00: the same pace runs out after midnight, when the window resets: NULL.
    ("2026-11-30T20:00:00", [(timedelta(hours=3), 1_000), (timedelta(minutes=50), 200), (timedelta(minutes=30), 300)],
     None),
    # Nothing in the last hour: no pace, no forecast.
    ("2026-11-30T10:00:00", [(timedelta(hours=2), 1_000)], None),
    # Spent: it ran out; exhausted_at is now.
    ("2026-11-30T10:00:00", [(timedelta(hours=2), 4_000), (timedelta(minutes=5), 1_200)], "2026-11-30T10:00:00.000Z"),
])
def test_forecast_with_an_injected_clock(tmp_path, clock, rows, expected):
    now = datetime.fromisoformat(clock).replace(tzinfo=timezone.utc)
    path = _at(now, rows, tmp_path)
    config = config_mod.parse('[pools.p]\nlimit = 5000\nwindow = "day"\nmodels = ["gpt-4o"]\n')
    ledger = Ledger(path, config, clock=lambda: now)
    try:
        status = next(s for s in ledger.status() if s.pool == "p")  # (beside the implicit batch pool)
    finally:
        ledger.close()
    assert (iso_utc(status.exhausted_at) if status.exhausted_at else None) == expected
    assert status.pace_per_hour == sum(t for ago, t in rows if ago <= timedelta(hours=1))
    # The SQL function (the Datasette API) with the same clock gives the same.
    conn = sqlite3.connect(path)
    register_functions(conn)
    ((text,),) = conn.execute("SELECT usage_status_json(?)", (iso_utc(now),)).fetchall()
    conn.close()
    assert [row for row in json.loads(text) if row["pool"] == "p"] == [pool_status.as_row(status)]


def test_dashboard_today_by_hour_follows_the_status(tmp_path):
    """The dashboard's hourly chart ends at the status's `used` and projects to where the pool runs out."""
    from test_datasette_helpers import metadata

    now = datetime.now(timezone.utc)
    path, config = build(tmp_path, now)
    sql = metadata()["plugins"]["datasette-dashboards"]["usage"]["charts"]["today-by-hour"]["query"]
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    register_functions(conn)
    try:
        points = [dict(r) for r in conn.execute(sql)]
        (status,) = [s for s in pool_status.statuses(conn, pool_status.published_scopes(conn), now)
                     if s.pool == "premium" and s.key_id is None]
    finally:
        conn.close()
    premium = [p for p in points if p["pool"] == "premium"]
    assert {p["pool"] for p in points} == {"premium"}  # mini is rolling, other has no limit
    used = [p for p in premium if p["series"] == "used"]
    assert used[0]["tokens"] == 0  # counting starts at the reset, 40 minutes ago
    assert used[-1]["tokens"] == status.used == 1_250
    assert [p["tokens"] for p in used] == sorted(p["tokens"] for p in used)
    start, end = [p for p in premium if p["series"] == "projection"]
    assert start["tokens"] == 1_250
    # At 2,250 tokens an hour, 3,550 remain (200 reserved): it runs out about 95 minutes from now.
    assert status.exhausted_at is not None
    # (the chart's SQL reads SQLite's clock, the status Python's: a second may tick between the two)
    paris = pool_status.ZoneInfo("Europe/Paris")
    drawn = datetime.strptime(end["time"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=paris)
    assert abs((drawn - status.exhausted_at).total_seconds()) <= 2
    assert end["tokens"] == pytest.approx(5_000 - 200, abs=2)


def test_forecast_alert_fires_once_when_switched_on(tmp_path):
    from addon.ledger.alerts import AlertEvaluator

    now = datetime(2026, 11, 30, 10, tzinfo=timezone.utc)
    path = _at(now, [(timedelta(hours=3), 1_000), (timedelta(minutes=30), 500)], tmp_path)
    config = config_mod.parse('[alerts]\nforecast = true\nthresholds = [90]\n'
                              '[pools.p]\nlimit = 5000\nwindow = "day"\nmodels = ["gpt-4o"]\n')
    assert config.forecast_alerts
    assert not config_mod.parse('[pools.p]\nmodels = []\n').forecast_alerts
    with pytest.raises(config_mod.ConfigError, match="forecast"):
        config_mod.parse('[alerts]\nforecast = "yes"\n[pools.p]\nmodels = []\n')
    ledger = Ledger(path, config, clock=lambda: now)
    try:
        thresholds = {"p": config.pools["p"].thresholds}
        assert AlertEvaluator(None).evaluate(ledger.db, ledger.status(), thresholds, now) == []  # off by default
        evaluator = AlertEvaluator(None)
        (alert,) = evaluator.evaluate(ledger.db, ledger.status(), thresholds, now, forecast=True)
        assert alert["threshold"] is None and alert["dedupe"].endswith("|forecast")
        assert "run out at 2026-11-30T17:00:00Z" in alert["message"] and "500 in the last hour" in alert["message"]
        assert evaluator.evaluate(ledger.db, ledger.status(), thresholds, now, forecast=True) == []
        # Another process (a new evaluator) does not fire it again either: the dedupe index.
        assert AlertEvaluator(None).evaluate(ledger.db, ledger.status(), thresholds, now, forecast=True) == []
    finally:
        ledger.close()


def test_top_shows_key_scopes_and_the_forecast(tmp_path):
    from rich.console import Console

    now = datetime.now(timezone.utc)
    path, _ = build(tmp_path, now)
    reader = top.Reader(path, None)
    snap = reader.snapshot(5, 0)
    reader.conn.close()
    console = Console(record=True, width=80, color_system=None)
    console.print(top.render(snap, "usage.db", 24))
    text = console.export_text()
    assert "premium/alice" in text and "mini/alice" in text
    # premium runs out in about 95 minutes at the last hour's pace (see test_dashboard_today_by_hour...).
    (line,) = [line for line in text.splitlines() if line.startswith("premium ")]
    assert " out 1h3" in line or " out 1h2" in line, line
