"""The command line (addon/tools/cli.py, click) in process with CliRunner, against real SQLite files.

Every command's --help, what each command prints and changes in the database, and the exit codes:
0 done, 1 an expected failure (`error: ...` on stderr, no traceback), 2 a usage error, 130 Ctrl-C.
The subprocess tests of `python -m addon ...` (test_top, test_reconcile, test_pool_status, ...) and
the wheel's console script (test_wheel) stay as they are.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import openai
import pytest
from click.testing import CliRunner
from fake_openai import FakeServer

from addon.ledger.sqlite_ledger import write_pools
from addon.store import schema
from addon.tools import cli as cli_mod
from addon.tools import run as run_mod
from addon.tools import status as status_mod
from addon.tools.cli import cli, main
from addon.windows import iso_utc

CONFIG = """
timezone = "UTC"
default_pool = "premium"

[pools.premium]
limit = 5_000
window = "rolling:2h"
models = ["gpt-4o*"]

[pools.mini]
limit = 2_000
window = "rolling:2h"
models = ["gpt-4o-mini*"]
"""
ADMIN = "sk-admin-test0123456789"

# Every command and the options its --help must list.
COMMANDS = {
    (): [],
    ("run",): ["--db", "--config", "--proxy-host", "--proxy-port", "--mode", "--datasette-host", "--datasette-port",
               "--datasette-arg", "--collect", "--verbose", "MITMDUMP_ARGS"],
    ("status",): ["--db", "--config", "--json", "--redis"],
    ("reset",): ["--db", "--config", "--key", "--note", "--redis", "POOL"],
    ("reprice",): ["--db", "--config"],
    ("top",): ["--db", "--config", "--interval", "--once"],
    ("reconcile",): ["--db", "--config", "--admin-key", "--base-url", "--days", "--bucket", "--every", "--alerts",
                     "--json"],
    ("keys",): ["create", "list", "revoke"],
    ("keys", "create"): ["LABEL", "--prefix", "--db", "--config"],
    ("keys", "list"): ["--json", "--db"],
    ("keys", "revoke"): ["WHICH", "--db"],
    ("collect",): ["--db", "--redis", "--once", "--consumer"],
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def db_path(tmp_path, config_file) -> Path:
    """A database the proxy started with CONFIG wrote: published pools, 1,234 premium and 56 mini tokens."""
    from addon import config as config_mod

    path = tmp_path / "usage.db"
    db = schema.connect(path)
    schema.migrate(db)
    write_pools(db, config_mod.load(str(config_file)))
    now = datetime.now(timezone.utc)
    with db.conn:
        for minutes, pool, model, tokens in ((30, "premium", "gpt-4o", 1_000), (10, "premium", "gpt-4o", 234),
                                             (5, "mini", "gpt-4o-mini", 56)):
            at = now - timedelta(minutes=minutes)
            db.conn.execute("INSERT INTO requests (ts, day, pool, model, endpoint, outcome, total_tokens) "
                            "VALUES (?, ?, ?, ?, 'chat.completions', 'ok', ?)",
                            (iso_utc(at), at.date().isoformat(), pool, model, tokens))
    db.conn.close()
    return path


def invoke(runner: CliRunner, *args: str, **kwargs) -> click.testing.Result:
    result = runner.invoke(cli, [str(a) for a in args], **kwargs)
    assert "Traceback" not in result.output
    return result


def commands_of(group: click.Group, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    found = {path}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found |= commands_of(command, path + (name,))
        else:
            found.add(path + (name,))
    return found


# -- help and usage errors ----------------------------------------------------------------------
def test_every_command_is_covered_here():
    assert commands_of(cli) == set(COMMANDS)


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "(group)")
def test_help(runner, path):
    for flag in ("--help", "-h"):
        result = invoke(runner, *path, flag)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Usage: ")
        for option in COMMANDS[path]:
            assert option in result.stdout, (path, option)


def test_commands_listed_in_their_order(runner):
    listed = [line.split()[0] for line in invoke(runner, "--help").stdout.split("Commands:")[1].splitlines()
              if line.startswith("  ") and not line.startswith("   ")]
    assert listed == ["run", "status", "reset", "reprice", "top", "reconcile", "keys", "collect"]


@pytest.mark.parametrize("path", [(), ("keys",)])
def test_a_group_without_a_command_prints_its_help_and_exits_2(runner, path):
    result = invoke(runner, *path)
    assert result.exit_code == 2
    assert "Commands:" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["frob"], "No such command 'frob'"),
    (["reconcile", "--every", "soon"], "not a duration: 'soon'"),
    (["reconcile", "--bucket", "2d"], "'2d' is not one of '1d', '1h'"),
    (["top", "--interval", "often"], "'often' is not a valid float"),
    (["run", "--proxy-port", "http"], "'http' is not a valid integer"),
    (["collect"], "Missing option '--redis'"),
    (["reset"], "Missing argument 'POOL'"),
    (["keys", "create"], "Missing argument 'LABEL'"),
    (["status", "--frob"], "No such option '--frob'"),
])
def test_usage_errors_exit_2(runner, args, message):
    result = invoke(runner, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_main_returns_the_exit_code(capsys, tmp_path):
    assert main(["--help"]) == 0
    assert main(["frob"]) == 2
    assert main(["status", "--db", str(tmp_path / "none.db")]) == 1
    assert "error: " in capsys.readouterr().err


# -- status and reset ----------------------------------------------------------------------------
def test_status_reads_the_published_pools(runner, db_path):
    result = invoke(runner, "status", "--db", db_path, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["pool"]: r for r in json.loads(result.stdout)}
    assert rows["premium"]["limit"] == 5_000 and rows["premium"]["used"] == 1_234
    assert rows["premium"]["remaining"] == 5_000 - 1_234
    assert rows["mini"]["used"] == 56 and rows["mini"]["resets_at_local"]
    table = invoke(runner, "status", "--db", db_path)
    assert table.exit_code == 0
    premium = next(line for line in table.stdout.splitlines() if "premium" in line)
    assert "5,000" in premium and "1,234" in premium and "3,766" in premium
    # The plain function, without click, prints the same.
    assert status_mod.run_status(str(db_path), as_json=True) == 0


def test_status_config_overrides_the_published_pools(runner, db_path, tmp_path):
    override = tmp_path / "override.toml"
    override.write_text(CONFIG.replace("limit = 5_000", "limit = 9_000"))
    result = invoke(runner, "status", "--db", db_path, "--config", override, "--json")
    rows = {r["pool"]: r for r in json.loads(result.stdout)}
    assert rows["premium"]["limit"] == 9_000 and rows["premium"]["used"] == 1_234


def test_reset_then_status(runner, db_path):
    result = invoke(runner, "reset", "premium", "--db", db_path, "--note", "new budget")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pool premium reset at ")
    rows = {r["pool"]: r for r in json.loads(invoke(runner, "status", "--db", db_path, "--json").stdout)}
    assert rows["premium"]["used"] == 0 and rows["mini"]["used"] == 56
    conn = sqlite3.connect(db_path)
    assert conn.execute("select pool, key_id, note from resets").fetchall() == [("premium", None, "new budget")]
    conn.close()
    keyed = invoke(runner, "reset", "mini", "--key", "abc123def456", "--db", db_path)
    assert keyed.exit_code == 0 and "pool mini for key abc123def456 reset at" in keyed.stdout


def test_reset_of_an_unknown_pool(runner, db_path):
    result = invoke(runner, "reset", "nope", "--db", db_path)
    assert result.exit_code == 1
    assert "error: unknown pool 'nope' (pools: premium, mini" in result.stderr


@pytest.mark.parametrize("command", [["status"], ["reset", "premium"]])
def test_a_missing_database_is_an_error(runner, tmp_path, command):
    missing = tmp_path / "none.db"
    result = invoke(runner, *command, "--db", missing)
    assert result.exit_code == 1
    assert result.stderr == f"error: {missing}: no such database (start the proxy first, or pass --db)\n"
    assert not missing.exists()


def test_top_once(runner, db_path, tmp_path):
    result = invoke(runner, "top", "--db", db_path, "--once")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) <= 24 and any("premium" in line and "1,234 / 5,000" in line for line in lines)
    missing = invoke(runner, "top", "--db", tmp_path / "none.db")
    assert missing.exit_code == 1 and "error: no database at" in missing.stderr


# -- config errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["status"], ["reset", "premium"], ["reprice"], ["top", "--once"],
                                     ["keys", "create", "alice"], ["run"],
                                     ["reconcile", "--admin-key", ADMIN, "--base-url", "http://127.0.0.1:9/v1"]])
def test_a_bad_config_is_an_error(runner, db_path, tmp_path, command):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pools.x]\nlimit = -1\n")
    result = invoke(runner, *command, "--db", db_path, "--config", bad)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {bad}") and "limit" in result.stderr
    missing = invoke(runner, *command, "--db", db_path, "--config", tmp_path / "none.toml")
    assert missing.exit_code == 1 and "error: " in missing.stderr and "none.toml" in missing.stderr


# -- keys ----------------------------------------------------------------------------------------
def test_keys_create_list_revoke(runner, tmp_path, config_file):
    db = tmp_path / "keys.db"  # created by the first command
    created = invoke(runner, "keys", "create", "alice", "--db", db, "--config", config_file)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("sk-usr-") and len(created.stdout.splitlines()) == 1
    assert "for 'alice'; it is shown only this once." in created.stderr
    other = invoke(runner, "keys", "create", "bob", "--prefix", "sk-team-", "--db", db)
    assert other.stdout.startswith("sk-team-")

    listed = json.loads(invoke(runner, "keys", "list", "--json", "--db", db).stdout)
    assert [(k["label"], k["revoked_at"], k["requests_today"]) for k in listed] == [("alice", None, 0),
                                                                                  ("bob", None, 0)]
    assert all("key_hash" not in k for k in listed)
    table = invoke(runner, "keys", "list", "--db", db).stdout
    assert "alice" in table and "active" in table

    revoked = invoke(runner, "keys", "revoke", key, "--db", db)
    assert revoked.exit_code == 0 and revoked.stdout.startswith(f"revoked {listed[0]['key_id']} (alice, ")
    again = invoke(runner, "keys", "revoke", "alice", "--db", db)
    assert again.exit_code == 1
    assert again.stdout == ""
    assert again.stderr == "error: no active issued key matches 'alice' (give a key id, a label or the key)\n"
    listed = json.loads(invoke(runner, "keys", "list", "--json", "--db", db).stdout)
    assert listed[0]["revoked_at"] and listed[1]["revoked_at"] is None


def test_keys_create_refuses_an_empty_label(runner, tmp_path):
    result = invoke(runner, "keys", "create", "  ", "--db", tmp_path / "keys.db")
    assert result.exit_code == 2 and result.stderr == "error: LABEL must not be empty\n" and result.stdout == ""


def test_keys_list_without_keys(runner, tmp_path):
    result = invoke(runner, "keys", "list", "--db", tmp_path / "keys.db")
    assert result.exit_code == 0 and "no issued keys" in result.stdout


# -- reprice ---------------------------------------------------------------------------------------
def test_reprice(runner, db_path):
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("update requests set input_tokens = 1000000, output_tokens = 0 where model = 'gpt-4o'")
    result = invoke(runner, "reprice", "--db", db_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"repriced 3 rows in {db_path}: 3 changed, 2 priced, ")
    costs = conn.execute("select cost_usd, cost_status from requests where model = 'gpt-4o'").fetchall()
    conn.close()
    assert costs == [(pytest.approx(2.5), "priced")] * 2  # gpt-4o: $2.50 per million input tokens


# -- reconcile (the fake server's admin endpoints) ----------------------------------------------------
@pytest.fixture
def admin_api(fake_server):
    """A plain-HTTP twin of the fake server that shares its record of served usage (as in test_reconcile)."""
    fake_server.state.clear()
    twin = FakeServer(tls=False)
    twin.state = fake_server.state
    twin.start()
    yield twin
    twin.stop()


def test_reconcile(runner, admin_api, db_path):
    base = f"http://127.0.0.1:{admin_api.port}/v1"
    direct = openai.OpenAI(api_key="sk-direct-0123456789abcdef", base_url=base)
    bypass = direct.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "around"}])
    # The base URL from the environment, as --base-url's help says.
    result = invoke(runner, "reconcile", "--db", db_path, "--admin-key", ADMIN, "--json",
                    env={"OPENAI_ADMIN_BASE_URL": base})
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    missed = {r["model"]: r for r in out["rows"]}["gpt-4o-mini-2024-07-18"]
    assert missed["openai_requests"] == 1 and missed["difference_tokens"] == bypass.usage.total_tokens
    table = invoke(runner, "reconcile", "--db", db_path, "--admin-key", ADMIN, "--base-url", base, "--bucket", "1h")
    assert table.exit_code == 0 and "(1h buckets, last 7 UTC days)" in table.stdout
    assert "gpt-4o-mini-2024-07-18" in table.stdout


def test_reconcile_errors(runner, admin_api, db_path):
    base = f"http://127.0.0.1:{admin_api.port}/v1"
    no_key = invoke(runner, "reconcile", "--db", db_path, "--base-url", base, env={"OPENAI_ADMIN_KEY": None})
    assert no_key.exit_code == 2 and "error: no admin key: set OPENAI_ADMIN_KEY" in no_key.stderr
    days = invoke(runner, "reconcile", "--db", db_path, "--admin-key", ADMIN, "--base-url", base, "--days", "0")
    assert days.exit_code == 2 and days.stderr == "error: --days must be between 1 and 366\n"
    denied = invoke(runner, "reconcile", "--db", db_path, "--admin-key", "sk-proj-notAdmin", "--base-url", base)
    assert denied.exit_code == 1 and "HTTP 401" in denied.stderr and "admin key" in denied.stderr


# -- collect and run: failures before they start anything -------------------------------------------
def test_collect_from_an_unreachable_redis(runner, tmp_path):
    result = invoke(runner, "collect", "--redis", "redis://:secret@127.0.0.1:9/0", "--once", "--db",
                    tmp_path / "central.db")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach Redis at redis://") and "secret" not in result.stderr


def test_status_from_an_unreachable_redis(runner, db_path):
    result = invoke(runner, "status", "--db", db_path, "--redis", "redis://127.0.0.1:9/0")
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:9")


def test_run_passes_its_options_on(runner, monkeypatch, tmp_path):
    seen: list[run_mod.RunOptions] = []
    monkeypatch.setattr(run_mod, "run", lambda options: seen.append(options) or 0)
    result = invoke(runner, "run", "--db", tmp_path / "u.db", "--proxy-port", "9080", "--mode",
                    "reverse:https://api.openai.com", "--datasette-arg=--setting=sql_time_limit_ms=500",
                    "--datasette-arg", "--cors", "--verbose", "--", "--set", "usage_block=kill")
    assert result.exit_code == 0, result.output
    options = seen[0]
    assert options == run_mod.RunOptions(db=str(tmp_path / "u.db"), proxy_port=9080,
                                         mode="reverse:https://api.openai.com",
                                         datasette_args=["--setting=sql_time_limit_ms=500", "--cors"], verbose=True,
                                         mitmdump_args=["--set", "usage_block=kill"])
    proxy = run_mod.proxy_command(options)
    assert proxy[-2:] == ["--set", "usage_block=kill"] and "flow_detail=0" not in proxy
    assert run_mod.datasette_command(options, tmp_path / "m.json")[-2:] == ["--setting=sql_time_limit_ms=500", "--cors"]
    # Without --verbose: a quiet console unless mitmdump was told otherwise.
    invoke(runner, "run", "--", "--set", "termlog_verbosity=info")
    quiet = run_mod.proxy_command(seen[1])
    assert "flow_detail=0" in quiet and "termlog_verbosity=warn" not in quiet
    assert seen[1] == run_mod.RunOptions(mitmdump_args=["--set", "termlog_verbosity=info"])
    # Options end at `--` or at the first argument that is not one of run's.
    invoke(runner, "run", "--verbose", "--", "--verbose", "--db", "x.db")
    assert seen[2] == run_mod.RunOptions(verbose=True, mitmdump_args=["--verbose", "--db", "x.db"])
    invoke(runner, "run", "--proxy-port", "9080", "upstream", "--set", "a=b")
    assert seen[3] == run_mod.RunOptions(proxy_port=9080, mitmdump_args=["upstream", "--set", "a=b"])
    unknown = invoke(runner, "run", "-q")  # before `--`, an option of mitmdump's is a usage error
    assert unknown.exit_code == 2 and "No such option '-q'" in unknown.stderr and len(seen) == 4


def test_run_refuses_a_bad_config_before_starting_anything(runner, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[pools.x]\nwindow = "fortnight"\n')
    result = invoke(runner, "run", "--db", tmp_path / "u.db", "--config", bad, "--proxy-port", "9")
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {bad}")
    assert "Metering OpenAI traffic" not in result.stdout  # nothing was started


# -- the group's handling of what commands raise or return ----------------------------------------------
def test_expected_failures_exit_1_and_ctrl_c_130(runner):
    import redis

    def raising(exc: BaseException):
        def command() -> int:
            raise exc
        return command

    group = cli_mod.Group("t")
    for name, exc in (("perm", PermissionError("usage.db: permission denied")),
                      ("conn", ConnectionError("cannot reach Redis at redis://h:6379")),
                      ("redis", redis.ResponseError("WRONGTYPE Operation against a key")),
                      ("interrupt", KeyboardInterrupt()), ("bug", RuntimeError("a bug"))):
        group.add_command(click.Command(name, callback=raising(exc)))
    group.add_command(click.Command("three", callback=lambda: 3))
    perm = runner.invoke(group, ["perm"])
    assert perm.exit_code == 1 and perm.stderr == "error: usage.db: permission denied\n"
    assert runner.invoke(group, ["conn"]).stderr == "error: cannot reach Redis at redis://h:6379\n"
    assert runner.invoke(group, ["redis"]).stderr == "error: WRONGTYPE Operation against a key\n"
    assert runner.invoke(group, ["interrupt"]).exit_code == 130
    assert runner.invoke(group, ["three"]).exit_code == 3
    bug = runner.invoke(group, ["bug"])
    assert isinstance(bug.exception, RuntimeError)  # a bug keeps its traceback


def test_the_readme_documents_every_option():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in COMMANDS:
        command: click.Command = cli
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        for param in command.params:
            names = param.opts if isinstance(param, click.Option) else [param.human_readable_name]
            if not any(f"`{name}" in section or f" {name}" in section for name in names if name not in ("-h",)):
                missing.append((" ".join(path), names))
        if path and f"`{' '.join(path)}" not in section:
            missing.append((" ".join(path), "the command"))
    assert not missing


@pytest.mark.parametrize("command", [("status",), ("keys", "list"), ("reprice",)])
def test_a_database_that_cannot_be_opened_is_one_error_line(runner, tmp_path, command):
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("these are notes, not a database " * 10)
    for db, said in ((tmp_path, "database: "), (not_a_database, "database: file is not a database")):
        result = invoke(runner, *command, "--db", db)
        assert result.exit_code == 1, (command, db, result.output)
        assert result.stderr.startswith("error: " + said) and result.stderr.count("\n") == 1, result.stderr


def test_top_shows_a_database_it_cannot_read_on_its_screen(runner, tmp_path):
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("these are notes, not a database " * 10)
    result = invoke(runner, "top", "--once", "--db", not_a_database)
    assert result.exit_code == 1
    shown = " ".join(result.stdout.split())  # rich wraps lines at the terminal width
    assert "cannot read the database" in shown and "file is not a database" in shown
