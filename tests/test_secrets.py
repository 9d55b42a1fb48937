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
import pytest
from conftest import start_proxy

KEY = "sk-proj-SECRETsecret0123456789LEAKCHECK"
QUERY_KEY = "azureSECRETquerykey0123456789"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _assert_no_secret_in(directory: Path) -> list[Path]:
    written = [p for p in directory.iterdir() if p.is_file()]
    for path in written:
        data = path.read_bytes()
        for secret in (KEY, KEY[3:-4], QUERY_KEY):
            assert secret.encode() not in data, f"{secret[:8]}... found in {path.name}"
    return written


def test_keys_never_written(tmp_path, confdir, fake_server):
    # The fixtures run termlog_verbosity=info, flow_detail=0 (what the README recommends).
    proxy = start_proxy(tmp_path, confdir, fake_server.port, mode="reverse", options={"usage_fail": "open"})
    url = f"{proxy.url}/v1/chat/completions"
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
    finally:
        proxy.stop()
    written = _assert_no_secret_in(tmp_path)
    assert {proxy.db, proxy.log_path} <= set(written)
    conn = sqlite3.connect(proxy.db)
    hints = {r[0] for r in conn.execute("select key_hint from requests")}
    conn.close()
    assert hints == {"sk-…HECK"}  # what is kept: the last 4 characters


def test_keys_never_written_during_a_database_outage(tmp_path, confdir, fake_server):
    """Rows go to the spool while the database cannot be written, then to the spool file at shutdown."""
    proxy = start_proxy(tmp_path, confdir, fake_server.port, mode="reverse", options={"usage_fail": "open"})
    url = f"{proxy.url}/v1/chat/completions"
    files = [proxy.db, Path(f"{proxy.db}-wal")]
    try:
        httpx.post(url, json=BODY, headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        proxy.wait_rows(1)
        # Root ignores permission bits: an immutable file is the outage that holds for every user.
        frozen = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True, text=True)
        if frozen.returncode != 0:
            pytest.skip(f"cannot simulate the outage: chattr +i failed ({frozen.stderr.strip() or frozen.returncode})")
        httpx.post(url, json=BODY, headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        httpx.post(url, json=BODY, headers={"api-key": KEY}, timeout=10)
        proxy.stop()
    finally:
        proxy.stop()
        subprocess.run(["chattr", "-i", *map(str, files)], capture_output=True)
    spools = list(tmp_path.glob("usage.db.spool-*.jsonl"))
    assert spools, "the rows of the outage were not saved to a spool file"
    assert sum(1 for line in spools[0].read_text().splitlines() if line.strip()) == 2
    _assert_no_secret_in(tmp_path)
