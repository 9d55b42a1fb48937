"""Keys never reach the database, its WAL, the spool file or the proxy log.

Grep the raw bytes of every file the proxy wrote, at the verbosities the
README recommends (termlog_verbosity=info, flow_detail=0), with errors on
the way and a database outage (rows in the spool, saved at shutdown).
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import httpx
from conftest import start_proxy

KEY = "sk-proj-SECRETsecret0123456789LEAKCHECK"
QUERY_KEY = "azureSECRETquerykey0123456789"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_keys_never_written(tmp_path, confdir, fake_server):
    # The fixtures run termlog_verbosity=info, flow_detail=0 (what the README recommends).
    proxy = start_proxy(tmp_path, confdir, fake_server.port, mode="reverse", options={"usage_fail": "open"})
    url = f"{proxy.url}/v1/chat/completions"
    files = [proxy.db, Path(f"{proxy.db}-wal")]
    try:
        cases = [
            ({"authorization": f"Bearer {KEY}"}, {}),
            ({"authorization": f"Bearer {KEY}"}, {"stream": True}),
            ({"authorization": f"Bearer {KEY}", "x-fake-status": "401"}, {}),
            ({"authorization": f"Bearer {KEY}", "x-fake-behavior": "short-body"}, {}),
            ({"authorization": f"Bearer {KEY}", "x-fake-behavior": "reset-mid-stream"}, {"stream": True}),
            ({"api-key": KEY}, {}),
        ]
        for headers, extra in cases:
            try:
                httpx.post(url, json={**BODY, **extra}, headers=headers, timeout=10)
            except httpx.HTTPError:
                pass
        assert len(proxy.wait_rows(len(cases))) == len(cases)
        # A query-string key: kept out of the db (path without query) and the log.
        httpx.post(f"{url}?api-version=1&api-key={QUERY_KEY}", json=BODY, headers={"api-key": KEY}, timeout=10)
        assert len(proxy.wait_rows(len(cases) + 1)) == len(cases) + 1
        # A database outage: rows go to the spool, then to the spool file at shutdown.
        immutable = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True).returncode == 0
        httpx.post(url, json=BODY, headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        proxy.stop()
    finally:
        proxy.stop()
        subprocess.run(["chattr", "-i", *map(str, files)], capture_output=True)
    written = [p for p in tmp_path.iterdir() if p.is_file()]
    assert {proxy.db, proxy.log_path, files[1]} <= set(written)
    if immutable:
        assert list(tmp_path.glob("usage.db.spool-*.jsonl"))
    for path in written:
        data = path.read_bytes()
        for secret in (KEY, KEY[3:-4], QUERY_KEY):
            assert secret.encode() not in data, f"{secret[:8]}... found in {path.name}"
    conn = sqlite3.connect(proxy.db)
    hints = {r[0] for r in conn.execute("select key_hint from requests")}
    conn.close()
    assert hints == {"sk-…HECK"}  # what is kept: the last 4 characters
