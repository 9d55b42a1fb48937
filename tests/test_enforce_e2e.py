"""Enforcement end to end: real mitmdump, the openai SDK (default retries on), the fake server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
from conftest import ROOT

LIMITS = """
timezone = "UTC"
default_pool = "premium"
[pools.premium]
limit = {premium}
window = "day"
models = ["gpt-4o"]
[pools.mini]
limit = 1000000
window = "day"
models = ["gpt-4o-mini"]
[alerts]
thresholds = [50, 80, 100]
"""

PROMPT = [{"role": "user", "content": "x" * 400}]
OUTPUT = 20  # max_tokens asked, and tokens the fake server produces


def write_config(tmp_path: Path, premium: int, extra: str = "") -> str:
    path = tmp_path / f"limits-{premium}.toml"
    path.write_text(LIMITS.format(premium=premium) + extra)
    return str(path)


def ask(client, model="gpt-4o", stream=False):
    return client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=OUTPUT, stream=stream, extra_headers={"x-fake-chunks": str(OUTPUT)}
    )


def request_size(proxy) -> int:
    rows = proxy.rows("outcome = 'ok'")
    return max(r["total_tokens"] for r in rows)


def test_blocks_at_the_limit_without_reaching_upstream_or_retrying(make_proxy, fake_server, tmp_path):
    proxy = make_proxy(options={"usage_config": write_config(tmp_path, 1000)})
    client = proxy.client()  # default max_retries=2
    admitted = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(20):
            ask(client)
            admitted += 1
    upstream_before = len(fake_server.state.calls("/chat/completions"))
    assert 3 <= admitted < 20
    error = refused.value
    assert error.status_code == 429
    assert error.response.headers["x-should-retry"] == "false"
    assert 0 < int(error.response.headers["retry-after"]) <= 86400
    message = error.body["message"]
    assert "'premium'" in message and "1,000" in message and "resets at" in message
    assert error.body["code"] == "usage_limit_exceeded"
    # Streaming requests are refused the same way, and nothing reached upstream.
    with pytest.raises(openai.RateLimitError):
        ask(client, stream=True)
    assert len(fake_server.state.calls("/chat/completions")) == upstream_before
    # The other pool is still open.
    assert ask(client, model="gpt-4o-mini").usage.total_tokens > 0
    rows = proxy.wait_rows(admitted + 3)
    blocked = [r for r in rows if r["outcome"] == "blocked"]
    assert len(blocked) == 2, "the SDK must not retry a refusal"
    assert all(r["status"] == 429 and r["pool"] == "premium" and r["total_tokens"] is None for r in blocked)
    used = sum(r["total_tokens"] for r in rows if r["pool"] == "premium" and r["outcome"] == "ok")
    assert used <= 1000


def test_kill_mode_closes_the_connection(make_proxy, fake_server, tmp_path):
    proxy = make_proxy(options={"usage_config": write_config(tmp_path, 0), "usage_block": "kill"})
    before = len(fake_server.state.calls("/chat/completions"))
    with pytest.raises(openai.APIConnectionError):
        ask(proxy.client(max_retries=0))
    assert len(fake_server.state.calls("/chat/completions")) == before
    rows = proxy.wait_rows(1)
    assert [(r["outcome"], r["status"]) for r in rows] == [("blocked", None)]
    assert "more than the whole daily limit of pool 'premium' (0 tokens)" in rows[0]["error"]


def race(clients: list, results: list[int]) -> None:
    """Each client asks until refused; count what was admitted."""

    def worker(client) -> None:
        count = 0
        while True:
            try:
                ask(client)
            except openai.RateLimitError:
                break
            count += 1
        results.append(count)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def used_tokens(db: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "select coalesce(sum(total_tokens), 0) from requests where pool = 'premium' and outcome = 'ok'"
        ).fetchone()[0]
    finally:
        conn.close()


def test_24_concurrent_clients_racing_for_a_limit(make_proxy, tmp_path, capsys):
    limit = 6000
    proxy = make_proxy(options={"usage_config": write_config(tmp_path, limit)})
    results: list[int] = []
    race([proxy.client() for _ in range(24)], results)
    assert len(results) == 24
    proxy.wait_rows(sum(results) + 24)
    size = request_size(proxy)
    used = used_tokens(proxy.db)
    with capsys.disabled():
        print(f"\n  24 clients, limit {limit}: used {used}, overshoot {used - limit}, request ~{size} tokens")
    assert used <= limit + size
    assert used >= limit - 3 * size


def test_two_proxy_processes_share_one_database(make_proxy, tmp_path, capsys):
    limit = 6000
    config = write_config(tmp_path, limit)
    db = tmp_path / "shared.db"
    first = make_proxy(options={"usage_config": config}, db=db)
    second = make_proxy(options={"usage_config": config}, db=db)
    results: list[int] = []
    race([first.client() for _ in range(12)] + [second.client() for _ in range(12)], results)
    first.wait_rows(sum(results) + 24)
    size = request_size(first)
    used = used_tokens(db)
    with capsys.disabled():
        print(f"\n  2 processes x 12 clients, limit {limit}: used {used}, overshoot {used - limit}, request ~{size}")
    assert used <= limit + 2 * size  # one request more per extra process
    assert used >= limit - 3 * size


def test_per_key_limit_with_label(make_proxy, tmp_path):
    from addon.metering.wire import key_id

    alice = "sk-alice-0123456789abcdef"
    extra = f'\n[keys.{key_id(alice)}]\nlabel = "alice"\nlimits = {{ premium = 400 }}\n'
    proxy = make_proxy(options={"usage_config": write_config(tmp_path, 100000, extra)})
    alice_client = proxy.client(api_key=alice)
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(10):
            ask(alice_client)
    assert f"key {key_id(alice)}" in refused.value.body["message"]
    assert ask(proxy.client()).usage.total_tokens > 0  # the pool itself is far from its limit
    rows = proxy.wait_rows(3)
    assert {r["label"] for r in rows if r["key_id"] == key_id(alice)} == {"alice"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addon", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_reset_and_status(make_proxy, tmp_path):
    config = write_config(tmp_path, 600)
    proxy = make_proxy(options={"usage_config": config})
    client = proxy.client()
    with pytest.raises(openai.RateLimitError):
        for _ in range(10):
            ask(client)
    status = json.loads(cli("status", "--db", str(proxy.db), "--config", config, "--json").stdout)
    premium = next(s for s in status if s["pool"] == "premium" and s["key_id"] is None)
    assert premium["limit"] == 600 and premium["used"] > 300 and premium["remaining"] < 300
    assert premium["resets_at"].endswith("T00:00:00.000Z")
    result = cli("reset", "premium", "--db", str(proxy.db), "--config", config)
    assert result.returncode == 0, result.stderr
    assert ask(client).usage.total_tokens > 0  # picked up at once
    table = cli("status", "--db", str(proxy.db), "--config", config).stdout
    assert "premium" in table and "600" in table
    bad = cli("reset", "nosuchpool", "--db", str(proxy.db), "--config", config)
    assert bad.returncode == 1 and "unknown pool" in bad.stderr


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Receiver.received
    server.shutdown()


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def test_alerts_fire_once_per_threshold_and_reach_the_webhook(make_proxy, tmp_path, webhook):
    url, received = webhook
    proxy = make_proxy(options={"usage_config": write_config(tmp_path, 1000), "usage_alert_webhook": url})
    client = proxy.client()
    for _ in range(3):  # 38 %
        ask(client)
    # An answer far longer than its estimate: usage crosses 50, 80 and 100 %.
    client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=OUTPUT,
                                   extra_headers={"x-fake-chunks": "700"})
    for _ in range(3):  # refusals do not fire again
        with pytest.raises(openai.RateLimitError):
            ask(client)
    assert wait_for(lambda: len(received) >= 3)
    time.sleep(1.5)  # a second evaluation tick must not add anything
    assert sorted(p["threshold"] for p in received) == [50, 80, 100]
    assert all(p["text"] == p["content"] and "premium" in p["text"] for p in received)
    import sqlite3

    conn = sqlite3.connect(proxy.db)
    alerts = conn.execute("select pool, threshold, delivered, message from alerts order by threshold").fetchall()
    assert [(a[0], a[1], a[2]) for a in alerts] == [("premium", 50, 1), ("premium", 80, 1), ("premium", 100, 1)]


def test_webhook_failures_are_recorded(tmp_path):
    from addon.ledger.alerts import WebhookSender
    from addon.store import schema

    db = schema.connect(tmp_path / "usage.db")
    schema.migrate(db)
    db.table("alerts").insert({"id": 1, "pool": "p", "message": "m", "delivered": 0, "threshold": 80})

    class Failing(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sender = WebhookSender(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "usage.db", backoff=(0.01, 0.02))
    sender.send({"id": 1, "message": "m", "pool": "p", "key_id": None, "threshold": 80, "used": 1, "limit": 2,
                 "window_start": "x", "ts": "y"})
    sender.close()
    server.shutdown()
    row = db.execute("select delivered, attempts, last_error from alerts where id = 1").fetchone()
    assert row == (0, 3, "HTTP 500")


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_fail_policy_when_the_database_is_locked(make_proxy, tmp_path, policy):
    """Another process holds the write lock: usage cannot be checked."""
    import sqlite3

    # A limit too small for spare tokens (1/64 of it is less than a request):
    # every request needs the database (a lease would admit from memory).
    proxy = make_proxy(options={"usage_config": write_config(tmp_path, 5000), "usage_fail": policy})
    client = proxy.client(max_retries=0)
    assert ask(client).usage.total_tokens > 0  # schema exists, pools published
    proxy.wait_rows(1)
    locker = sqlite3.connect(proxy.db, timeout=10)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        if policy == "open":
            assert ask(client).usage.total_tokens > 0
        else:
            with pytest.raises(openai.InternalServerError) as refused:
                ask(client)
            assert refused.value.status_code == 503
            assert refused.value.body["code"] == "usage_unavailable"
            assert refused.value.response.headers["x-should-retry"] == "false"
    finally:
        locker.rollback()
        locker.close()
    rows = proxy.wait_rows(2)
    assert [r["outcome"] for r in rows] == ["ok", "ok" if policy == "open" else "blocked"]
    assert proxy.log().count("cannot check limits") == 1


def test_far_from_the_limit_requests_are_admitted_from_the_lease(make_proxy, tmp_path):
    """The first request reserves spare tokens; the next ones are admitted in
    memory, so they pass even while the database is locked and the pools
    fail closed. Their rows land, and their estimates leave the lease, once
    the lock is gone."""
    import sqlite3

    proxy = make_proxy(options={"usage_config": write_config(tmp_path, 1_000_000), "usage_fail": "closed"})
    client = proxy.client(max_retries=0)
    assert ask(client).usage.total_tokens > 0
    proxy.wait_rows(1)
    locker = sqlite3.connect(proxy.db, timeout=10)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(3):
            assert ask(client).usage.total_tokens > 0
    finally:
        locker.rollback()
        locker.close()
    rows = proxy.wait_rows(4)
    assert [r["outcome"] for r in rows] == ["ok"] * 4
    assert "cannot check limits" not in proxy.log()
    conn = sqlite3.connect(proxy.db)
    try:
        (reserved,) = conn.execute("select sum(tokens) from reservations where pool = 'premium'").fetchone()
    finally:
        conn.close()
    assert 0 < reserved <= 1_000_000 // 64  # what is left is spare: every row took its estimate off
