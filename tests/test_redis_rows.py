"""Rows past one machine: proxies publish to a Redis Stream, `collect` writes one central database.

Real redis-server, real mitmdump processes, the real SDK, the real `collect` command.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from conftest import ROOT, free_port
from redis_server import wait_for

from addon.store import inserts, redis_rows, schema


def collect_once(db, url) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addon", "collect", "--redis", url, "--db", str(db), "--once"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def count(db, where="1") -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"select count(*) from requests where {where}").fetchone()[0]
    except sqlite3.OperationalError:  # the collector has not created its tables yet
        return 0
    finally:
        conn.close()


def local_rows(path, n: int, origin_model: str = "gpt-4o-mini") -> None:
    """A proxy database with n committed rows (as the writer leaves them)."""
    db = schema.connect(path)
    schema.migrate(db)
    rows = [{"ts": "2026-11-30T00:00:00.000Z", "day": "2026-11-30", "host": "api.openai.com", "method": "POST",
             "path": "/v1/chat/completions", "endpoint": "chat.completions", "model": origin_model, "pool": "mini",
             "status": 200, "outcome": "ok", "input_tokens": 10, "output_tokens": i, "total_tokens": 10 + i}
            for i in range(n)]
    with db.conn:
        inserts.insert_rows(db, rows)
    db.conn.close()


TRACKED = "ft:gpt-4o-mini:org::tracked"  # the bundled config's track-only pool (ft:*)


def test_three_proxies_one_central_database(tmp_path, make_proxy, redis_server):
    """Three proxies with their own databases (three hosts): every row reaches the central database once."""
    proxies = [make_proxy(db=tmp_path / f"host{i}.db", options={"usage_redis": redis_server.url}) for i in range(3)]
    for i, proxy in enumerate(proxies):
        client = proxy.client()
        for _ in range(i + 2):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    local = [len(p.wait_rows(i + 2)) for i, p in enumerate(proxies)]
    assert local == [2, 3, 4]
    stream = redis_server.client()
    assert wait_for(lambda: stream.xlen(redis_rows.STREAM) >= 9), stream.xlen(redis_rows.STREAM)
    central = tmp_path / "central.db"
    done = collect_once(central, redis_server.url)
    assert done.returncode == 0, done.stderr
    assert "collected 9 new rows" in done.stdout
    conn = sqlite3.connect(central)
    got = conn.execute("select count(*), count(distinct uid), count(distinct origin), sum(total_tokens) "
                       "from requests").fetchone()
    local_tokens = sum(sum(r["total_tokens"] for r in p.rows()) for p in proxies)
    assert got == (9, 9, 3, local_tokens)
    # Running it again inserts nothing: the entries are acknowledged.
    again = collect_once(central, redis_server.url)
    assert "collected 0 new rows" in again.stdout
    assert count(central) == 9


def test_rows_wait_locally_while_redis_is_down(tmp_path, make_proxy, redis_server):
    # A track-only pool: while Redis is away, limited pools fail closed (tests/test_redis_e2e.py).
    proxy = make_proxy(options={"usage_redis": redis_server.url})
    client = proxy.client(max_retries=0)
    client.chat.completions.create(model=TRACKED, messages=[{"role": "user", "content": "one"}])
    stream = redis_server.client()
    assert wait_for(lambda: stream.xlen(redis_rows.STREAM) == 1)
    redis_server.stop()  # no persistence: the stream is gone with it
    for _ in range(3):  # proxying goes on
        client.chat.completions.create(model=TRACKED, messages=[{"role": "user", "content": "two"}])
    assert len(proxy.wait_rows(4)) == 4
    time.sleep(2.5)
    assert "cannot publish rows to Redis" in proxy.log()
    redis_server.start()
    stream = redis_server.client()
    # The three rows written while Redis was away are published when it is back, and the first one again:
    # it went into the stream this Redis lost with its restart (no collector had taken it).
    assert wait_for(lambda: stream.xlen(redis_rows.STREAM) >= 4, timeout=20), proxy.log()
    central = tmp_path / "central.db"
    assert collect_once(central, redis_server.url).returncode == 0
    assert count(central) == 4
    assert "publishing rows to Redis" in proxy.log()


def test_collector_killed_mid_batch_inserts_nothing_twice(tmp_path, redis_server):
    """kill -9 of a collector while it works, then a restart: every row exactly once."""
    total = 20_000
    local = tmp_path / "proxy.db"
    local_rows(local, total)
    db = schema.connect(local)
    client = redis_rows.connect(redis_server.url)
    assert redis_rows.publish_pending(db, client) == total
    # A crash after XADD and before the cursor moved publishes rows again: the uid makes them harmless.
    with db.conn:
        db.execute("UPDATE redis_outbox SET last_id = last_id - 500")
    assert redis_rows.publish_pending(db, client) == 500
    db.conn.close()
    central = tmp_path / "central.db"
    proc = subprocess.Popen([sys.executable, "-m", "addon", "collect", "--redis", redis_server.url,
                             "--db", str(central), "--consumer", "c1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: central.exists() and count(central) > 0, timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = count(central)
    assert 0 < partial < total, partial  # it was killed while rows remained
    pending = client.xpending(redis_rows.STREAM, redis_rows.GROUP)
    # Restarted under the same name, it first re-reads what it had read but not acknowledged.
    done = subprocess.run([sys.executable, "-m", "addon", "collect", "--redis", redis_server.url,
                           "--db", str(central), "--consumer", "c1", "--once"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    conn = sqlite3.connect(central)
    assert conn.execute("select count(*), count(distinct uid), sum(output_tokens) from requests").fetchone() == (
        total, total, sum(range(total)))
    assert client.xpending(redis_rows.STREAM, redis_rows.GROUP)["pending"] == 0
    assert pending is not None


def test_collector_takes_over_entries_a_dead_collector_left(tmp_path, redis_server):
    local = tmp_path / "proxy.db"
    local_rows(local, 50)
    db = schema.connect(local)
    client = redis_rows.connect(redis_server.url)
    redis_rows.publish_pending(db, client)
    redis_rows.ensure_group(client)
    # A collector on another host read 50 entries and died before acknowledging them.
    client.xreadgroup(redis_rows.GROUP, "dead-host", {redis_rows.STREAM: ">"}, count=50)
    central = tmp_path / "central.db"
    stats = redis_rows.collect(central, redis_server.url, consumer="alive", once=True, claim_idle_ms=0)
    assert (stats.inserted, count(central)) == (50, 50)


def test_unreachable_redis_stops_start_up_with_a_clear_message(tmp_path):
    from conftest import MITMDUMP

    port = free_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    proc = subprocess.run(
        [MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", str(free_port()), "--set", f"confdir={tmp_path}",
         "-s", str(ROOT / "addon" / "usage.py"), "--set", f"usage_db={tmp_path / 'usage.db'}",
         "--set", f"usage_redis={url}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert f"usage_redis: cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in output
    assert "s3cret" not in output
    bad = collect_once(tmp_path / "c.db", f"redis://127.0.0.1:{port}/0")
    assert bad.returncode == 1 and "cannot reach Redis" in bad.stderr and "Traceback" not in bad.stderr


def test_entry_of_a_row_written_before_uids(tmp_path):
    entry = redis_rows.entry_for({"id": 7, "model": "gpt-4o", "uid": None, "cost_usd": None}, "host-a")
    assert entry == {"row": '{"model":"gpt-4o","uid":"host-a:7","origin":"host-a"}'}


def test_password_is_redacted():
    assert redis_rows.redacted("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    assert redis_rows.redacted("rediss://:pw@h/1") == "rediss://:***@h/1"
    assert redis_rows.redacted("redis://h:6379/0") == "redis://h:6379/0"
