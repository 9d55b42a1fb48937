"""Webhooks survive restarts: alerts with delivered = 0 are sent by the next proxy that starts."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer

import openai
import pytest
from test_enforce_e2e import Receiver, ask, write_config

from addon.windows import iso_utc


@pytest.fixture
def webhook():
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Receiver.received
    server.shutdown()


def test_undelivered_alerts_are_sent_after_a_restart(make_proxy, tmp_path, webhook):
    url, received = webhook
    config = write_config(tmp_path, 1000)
    # First run: no webhook reachable (none configured), the pool runs out, alerts are recorded undelivered.
    first = make_proxy(options={"usage_config": config})
    client = first.client(max_retries=0)
    with pytest.raises(openai.RateLimitError):
        for _ in range(20):
            ask(client)
    deadline = time.monotonic() + 20
    conn = sqlite3.connect(first.db)
    while time.monotonic() < deadline:
        fired = conn.execute("select id from alerts where delivered = 0 order by id").fetchall()
        if len(fired) == 2:
            break
        time.sleep(0.1)
    # 50 and 80 %: usage stops short of the limit, and a refusal is no usage (the 100 % alert needs 100 % used).
    assert len(fired) == 2
    first.stop()
    # Not sent again: an old one (beyond the 24 h bound) and one already delivered.
    old = iso_utc(datetime.now(timezone.utc) - timedelta(days=3))
    with conn:
        conn.execute("insert into alerts (ts, pool, threshold, used, \"limit\", message, delivered, attempts, dedupe)"
                     " values (?, 'premium', 50, 1, 2, 'old', 0, 5, 'old')", (old,))
        conn.execute("insert into alerts (ts, pool, threshold, used, \"limit\", message, delivered, attempts, dedupe)"
                     " values (?, 'premium', 50, 1, 2, 'done', 1, 1, 'done')", (iso_utc(datetime.now(timezone.utc)),))
    started = time.monotonic()
    make_proxy(options={"usage_config": config, "usage_alert_webhook": url})
    deadline = started + 20
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    took = time.monotonic() - started
    assert sorted(p["threshold"] for p in received) == [50, 80], received
    assert took < 10, f"resent after {took:.1f} s"
    time.sleep(1.0)
    assert len(received) == 2  # once each, and never the old or delivered ones
    rows = conn.execute("select message, delivered, attempts from alerts order by id").fetchall()
    conn.close()
    assert [r[1] for r in rows[:2]] == [1, 1] and all(r[2] >= 1 for r in rows[:2])
    assert rows[2] == ("old", 0, 5) and rows[3] == ("done", 1, 1)
