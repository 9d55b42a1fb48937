"""Webhooks survive restarts: alerts with delivered = 0 are sent by the next proxy that starts."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path

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
    # Limits admit no overshoot since issue 13 (used stays below 100 %): thresholds the refused run crosses.
    config = write_config(tmp_path, 1000).replace("limits-1000", "limits-resend")
    Path(config).write_text((tmp_path / "limits-1000.toml").read_text().replace("[50, 80, 100]", "[25, 50, 80]"))
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
        if len(fired) == 3:
            break
        time.sleep(0.1)
    assert len(fired) == 3  # 25, 50, 80 %
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
    while len(received) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    took = time.monotonic() - started
    assert sorted(p["threshold"] for p in received) == [25, 50, 80], received
    assert took < 10, f"resent after {took:.1f} s"
    time.sleep(1.0)
    assert len(received) == 3  # once each, and never the old or delivered ones
    rows = conn.execute("select message, delivered, attempts from alerts order by id").fetchall()
    conn.close()
    assert [r[1] for r in rows[:3]] == [1, 1, 1] and all(r[2] >= 1 for r in rows[:3])
    assert rows[3] == ("old", 0, 5) and rows[4] == ("done", 1, 1)
