"""`python -m addon top` in a real 80x24 terminal (tmux), fed by a real proxy."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from conftest import ROOT

from addon.store import schema
from addon.tools import top
from addon.windows import iso_utc

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is needed (apt-get install tmux)")

CONFIG = """
timezone = "UTC"
default_pool = "premium"
estimate_output_tokens = 16
[pools.premium]
limit = 2000
window = "day"
models = ["gpt-4o", "gpt-5"]
[pools.mini]
window = "day"
models = ["gpt-4o-mini"]
"""


class Terminal:
    """A tmux session of 80x24 on a private server socket."""

    def __init__(self, tmp_path, command: list[str]) -> None:
        self.socket = str(tmp_path / "tmux.sock")
        shell = " ".join(f"'{part}'" for part in command) + " ; echo EXITED $? ; sleep 30"
        self.tmux("new-session", "-d", "-s", "t", "-x", "80", "-y", "24", shell)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "t").split("\n")[:24]

    def wait_for(self, predicate, timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if predicate("\n".join(lines)) or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def terminal(tmp_path):
    opened: list[Terminal] = []

    def open_(command: list[str]) -> Terminal:
        term = Terminal(tmp_path, command)
        opened.append(term)
        return term

    yield open_
    for term in opened:
        term.close()


def line_with(lines: list[str], start: str) -> list[str]:
    (line,) = [ln for ln in lines if ln.startswith(start)]
    return line.split()


def test_top_live_view_follows_the_proxy(make_proxy, terminal, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    proxy = make_proxy(options={"usage_config": str(config)})
    client = proxy.client()
    answers = [client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello " * n}])
               for n in (1, 2)]
    proxy.wait_rows(2)
    term = terminal([sys.executable, "-m", "addon", "top", "--db", str(proxy.db), "--config", str(config)])
    lines = term.wait_for(lambda s: "2 of 2" in s)
    assert lines[0].startswith("usage top · usage.db ·") and "q quit" in lines[0]
    assert all(len(line) <= 80 for line in lines)
    tokens = sum(a.usage.total_tokens for a in answers)
    for period in ("today", "this week", "this month"):
        assert line_with(lines, period)[-3:-1] == ["2", f"{tokens:,}"]
    assert line_with(lines, "12 months")[2:4] == ["2", f"{tokens:,}"]
    premium = line_with(lines, "premium")
    assert f"{tokens:,}" in premium and "2,000" in premium and f"{100 * tokens / 2000:.0f}%" in premium
    assert "track only" in " ".join(line_with(lines, "mini"))
    rows = [ln for ln in lines if "gpt-4o-2024-08-06" in ln]
    assert len(rows) == 2 and "chat.comple" in rows[0] and " 200 " in rows[0]

    # New rows show up without a key press.
    streamed = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "s"}],
                                              stream=True)
    assert len(list(streamed)) > 1
    lines = term.wait_for(lambda s: "3 of 3" in s)
    assert "gpt-4o-mini" in lines[lines.index(next(ln for ln in lines if ln.startswith("time"))) + 1]
    assert line_with(lines, "today")[1] == "3"

    # Scrolling: j moves one row down, k back, and q quits cleanly.
    term.keys("j")
    lines = term.wait_for(lambda s: "2-3 of 3" in s)
    assert "2-3 of 3" in "\n".join(lines) and "scrolled" in "\n".join(lines)
    term.keys("Up")
    assert "1-3 of 3" in "\n".join(term.wait_for(lambda s: "1-3 of 3" in s))
    term.keys("q")
    assert "EXITED 0" in "\n".join(term.wait_for(lambda s: "EXITED" in s))


def test_top_never_blocks_the_writer(terminal, tmp_path):
    """With top refreshing, a writer that waits for no lock at all is never refused."""
    db_path = tmp_path / "usage.db"
    db = schema.connect(db_path)
    schema.migrate(db)
    term = terminal([sys.executable, "-m", "addon", "top", "--db", str(db_path), "--interval", "0.2"])
    term.wait_for(lambda s: "no requests yet" in s)
    writer = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    writer.execute("PRAGMA busy_timeout = 0")
    failures: list[str] = []
    for i in range(300):
        now = datetime.now(timezone.utc)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO requests (ts, day, model, pool, endpoint, status, outcome, total_tokens)"
                           " VALUES (?, ?, 'gpt-4o', 'premium', 'chat.completions', 200, 'ok', 10)",
                           (iso_utc(now), now.date().isoformat()))
            writer.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            failures.append(str(exc))
            if writer.in_transaction:
                writer.execute("ROLLBACK")
        time.sleep(0.005 if i % 10 else 0.05)  # let top refresh many times in between
    assert failures == []
    lines = term.wait_for(lambda s: "of 300" in s)
    assert line_with(lines, "today")[1:3] == ["300", "3,000"]
    # And top itself never saw a locked database either.
    assert "cannot read" not in "\n".join(lines)


def test_once_and_errors(tmp_path):
    db_path = tmp_path / "usage.db"
    missing = subprocess.run([sys.executable, "-m", "addon", "top", "--db", str(db_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "no database" in missing.stderr
    db = schema.connect(db_path)
    schema.migrate(db)
    db.table("requests").insert({"ts": "2020-01-01T00:00:00.000Z", "day": "2020-01-01", "model": "old",
                                 "total_tokens": 5})
    out = subprocess.run([sys.executable, "-m", "addon", "top", "--db", str(db_path), "--once"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    # A row from 2020 is in none of the periods but is listed.
    assert line_with(lines, "12 months")[2] == "0"
    assert "1-1 of 1" in out.stdout and "old" in out.stdout


def test_keys_and_totals_units():
    assert top.parse_keys("jk\x1b[A\x1b[Bq") == ["down", "up", "up", "down", "quit"]
    assert top.parse_keys("\x1b[6~\x1b[5~g") == ["pgdown", "pgup", "home"]
    conn = sqlite3.connect(":memory:")
    conn.execute("create table requests (id integer primary key, ts text, total_tokens int, cost_usd real)")
    now = datetime(2026, 3, 18, 12, 0, tzinfo=timezone.utc)  # a Wednesday
    for ts, tokens in [("2026-03-18T01:00:00.000Z", 1), ("2026-03-16T00:00:00.000Z", 10),
                       ("2026-03-01T00:00:00.000Z", 100), ("2025-04-01T00:00:00.000Z", 1000),
                       ("2025-03-01T00:00:00.000Z", 10000)]:
        conn.execute("insert into requests (ts, total_tokens, cost_usd) values (?, ?, 0.5)", (ts, tokens))
    totals = top.Totals()
    from zoneinfo import ZoneInfo

    top.update_totals(conn, totals, now, ZoneInfo("UTC"))
    assert {p: v[1] for p, v in totals.values.items()} == {"today": 1, "this week": 11, "this month": 111,
                                                          "12 months": 1111}
    conn.execute("insert into requests (ts, total_tokens, cost_usd) values ('2026-03-18T11:00:00.000Z', 5, 1)")
    top.update_totals(conn, totals, now, ZoneInfo("UTC"))  # incremental: only the new row is read
    assert totals.values["today"] == [2, 6, 1.5]
    assert totals.values["12 months"][1] == 1116
