"""The JSON API: Datasette canned queries over a database filled through the real proxy.

Every figure is checked against the rows of `requests` (and `alerts`), and the
window arithmetic of `status` against addon/windows.py for each window kind
and a non-UTC time zone.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import openai
import pytest
from test_datasette_helpers import METADATA, Datasette, publish_pools, run_canned

from addon import config as config_mod
from addon.datasette import metadata
from addon.metering.wire import key_id
from addon.store import schema
from addon.windows import iso_utc, local_day

ROOT = Path(__file__).resolve().parent.parent
OTHER_KEY = "sk-proj-second0123456789abcdefQRST"

CONFIG = f"""
timezone = "UTC"
default_pool = "premium"

[pools.premium]
limit = 1_000_000
window = "day"
models = ["gpt-4o", "gpt-5"]

[pools.mini]
limit = 5_000_000
window = "rolling:24h"
models = ["gpt-4o-mini", "text-embedding-*"]

[pools.tiny]
limit = 1
window = "week"
models = ["gpt-4.1-nano"]

[keys.{key_id(OTHER_KEY)}]
label = "alice"
"""


def rows_of(db: Path, where: str = "1") -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"select * from requests where {where} order by id")]
    finally:
        conn.close()


def approx_sum(values) -> float | None:
    present = [v for v in values if v is not None]
    return pytest.approx(sum(present), abs=1e-9) if present else None  # the API rounds to 1e-9 USD


def traffic(proxy) -> int:
    """A mix of calls; returns how many rows they make."""
    client = proxy.client()
    alice = proxy.client(api_key=OTHER_KEY)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello there"}])
    alice.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    for _ in alice.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "s"}],
                                           stream=True):
        pass
    client.responses.create(model="gpt-5", input="write a haiku")
    client.embeddings.create(model="text-embedding-3-small", input="embed me")
    with pytest.raises(openai.InternalServerError):
        client.with_options(max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], extra_headers={"x-fake-status": "500"})
    # A pool with a 1-token limit: refused when limits are enforced, recorded either way.
    with pytest.raises(openai.APIStatusError):
        client.with_options(max_retries=0).chat.completions.create(
            model="gpt-4.1-nano", messages=[{"role": "user", "content": "x"}], extra_headers={"x-fake-status": "429"})
    return 7


@pytest.fixture
def filled(make_proxy, tmp_path):
    """A proxy with traffic recorded, pools published, and Datasette serving the same file."""
    config_path = tmp_path / "config.toml"
    config_path.write_text(CONFIG)
    proxy = make_proxy(options={"usage_config": str(config_path)})
    count = traffic(proxy)
    assert len(proxy.wait_rows(count)) == count
    publish_pools(proxy.db, config_mod.load(config_path))
    ds = Datasette(proxy.db, tmp_path / "datasette.log")
    yield proxy, ds
    ds.stop()


def test_status_matches_rows(filled):
    proxy, ds = filled
    status = ds.json("/usage/status.json?_shape=array")
    assert isinstance(status, list)
    by_pool = {s["pool"]: s for s in status}
    # batch: the track-only pool batches count in when the config names none (batch_pool)
    assert set(by_pool) == {"premium", "mini", "tiny", "batch"}
    now = datetime.now(timezone.utc)
    rows = rows_of(proxy.db)
    for name, window_start in (("premium", now.replace(hour=0, minute=0, second=0, microsecond=0)),
                               ("mini", now - timedelta(hours=24))):
        used = sum(r["total_tokens"] or 0 for r in rows if r["pool"] == name and r["ts"] >= iso_utc(window_start))
        s = by_pool[name]
        assert used > 0
        assert s["used"] == used
        # What the proxy would still admit: requests in flight and its lease's spare tokens are held.
        assert s["reserved"] >= 0
        assert s["remaining"] == max(s["limit"] - used - s["reserved"] - s["held"], 0)
        assert s["percentage"] == pytest.approx(round(100 * used / s["limit"], 2))
    premium = by_pool["premium"]
    assert premium["window_start"] == iso_utc(now.replace(hour=0, minute=0, second=0, microsecond=0))
    assert premium["resets_at"] == iso_utc(now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1))
    # Rolling: usage counts since now - 24 h; it first shrinks when the oldest counted call ages out.
    mini = by_pool["mini"]
    oldest = min(r["ts"] for r in rows if r["pool"] == "mini" and r["total_tokens"])
    assert mini["resets_at"] == iso_utc(datetime.fromisoformat(oldest) + timedelta(hours=24))
    assert abs(datetime.fromisoformat(mini["window_start"]) - (now - timedelta(hours=24))) < timedelta(minutes=2)
    monday = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    assert by_pool["tiny"]["window_start"] == iso_utc(monday)
    assert by_pool["tiny"]["resets_at"] == iso_utc(monday + timedelta(days=7))


def test_history_by_model_by_key_match_rows(filled):
    proxy, ds = filled
    rows = rows_of(proxy.db)
    history = ds.json("/usage/history.json?days=7&_shape=array")
    expected: dict[tuple, dict] = defaultdict(lambda: {"requests": 0, "tokens": 0, "costs": []})
    for r in rows:
        e = expected[(r["day"], r["pool"])]
        e["requests"] += 1
        e["tokens"] += r["total_tokens"] or 0
        e["costs"].append(r["cost_usd"])
    assert {(h["day"], h["pool"]) for h in history} == set(expected)
    for h in history:
        e = expected[(h["day"], h["pool"])]
        assert (h["requests"], h["tokens"]) == (e["requests"], e["tokens"])
        assert h["cost_usd"] == approx_sum(e["costs"])
    assert sum(h["requests"] for h in history) == len(rows)
    assert any(h["cost_usd"] for h in history)

    by_model = ds.json("/usage/by_model.json?_shape=array")
    for m in by_model:
        mine = [r for r in rows if r["model"] == m["model"] and r["pool"] == m["pool"]]
        assert m["requests"] == len(mine)
        assert m["tokens"] == sum(r["total_tokens"] or 0 for r in mine)
        assert m["cached_tokens"] == sum(r["cached_tokens"] or 0 for r in mine)
        assert m["cost_usd"] == approx_sum(r["cost_usd"] for r in mine)
    assert {m["model"] for m in by_model} >= {"gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18", "gpt-5-2025-08-07"}

    by_key = {k["key_id"]: k for k in ds.json("/usage/by_key.json?_shape=array")}
    alice = by_key[key_id(OTHER_KEY)]
    assert alice["label"] == "alice" and alice["key_hint"] == "sk-…QRST"
    assert alice["requests"] == 2
    assert alice["tokens"] == sum(r["total_tokens"] or 0 for r in rows if r["key_id"] == key_id(OTHER_KEY))
    assert sum(k["requests"] for k in by_key.values()) == len(rows)


def test_recent_blocked_alerts_and_shapes(filled):
    proxy, ds = filled
    rows = rows_of(proxy.db)
    recent = ds.json("/usage/recent.json?_shape=array&rows=3")
    assert [r["id"] for r in recent] == [r["id"] for r in rows][::-1][:3]
    assert "cost_usd" in recent[0] and "key_hint" in recent[0]
    blocked = ds.json("/usage/blocked.json?_shape=array")
    assert [b["id"] for b in blocked] == [r["id"] for r in rows if r["outcome"] == "blocked"][::-1]
    # The default shape is Datasette's object with rows; _shape=array is a plain list.
    full = ds.json("/usage/history.json")
    assert isinstance(full, dict) and full["ok"] is True and "rows" in full
    # Alerts: rows of the alerts table within the last days.
    db = schema.connect(proxy.db)
    now = datetime.now(timezone.utc)
    with db.conn:
        db.table("alerts").insert_all([
            {"ts": iso_utc(now - timedelta(minutes=5)), "pool": "premium", "window_start": iso_utc(now),
             "threshold": 80.0, "used": 800_000, "limit": 1_000_000, "message": "premium at 80%",
             "delivered": 1, "dedupe": "a"},
            {"ts": iso_utc(now - timedelta(days=30)), "pool": "premium", "window_start": iso_utc(now),
             "threshold": 100.0, "used": 1_000_000, "limit": 1_000_000, "message": "old",
             "delivered": 0, "dedupe": "b"},
        ])
    db.conn.close()
    alerts = ds.json("/usage/alerts.json?days=7&_shape=array")
    mine = [a for a in alerts if a["message"] in ("premium at 80%", "old")]
    assert [(a["pool"], a["threshold"], a["used"], a["limit"], a["delivered"]) for a in mine] == [
        ("premium", 80.0, 800_000, 1_000_000, 1)]
    assert {"ts", "pool", "threshold", "used", "limit", "message", "delivered"} <= set(alerts[0])
    assert any(a["message"] == "old" for a in ds.json("/usage/alerts.json?days=31&_shape=array"))


def test_datasette_reads_while_proxy_writes(filled):
    """WAL: Datasette keeps answering while the proxy writes, and sees new rows."""
    proxy, ds = filled
    before = {s["pool"]: s["used"] for s in ds.json("/usage/status.json?_shape=array")}
    client = proxy.client()
    for i in range(5):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"more {i}"}])
        assert ds.json("/usage/status.json?_shape=array")
    proxy.wait_rows(12)
    used = sum(r["total_tokens"] or 0 for r in rows_of(proxy.db, "pool = 'premium'"))
    after = {s["pool"]: s["used"] for s in ds.json("/usage/status.json?_shape=array")}
    assert after["premium"] == used > before["premium"]
    assert "database is locked" not in ds.log() and "Traceback" not in ds.log()


def test_pages_render(filled):
    _, ds = filled
    for path in ("/", "/usage", "/usage/requests", "/usage/status", "/usage/history?days=3", "/-/dashboards/usage",
                 "/usage/requests?_facet=model"):
        status, body = ds.get(path)
        assert status == 200, (path, body[:500])
    tables = {t["name"]: t for t in ds.json("/usage.json")["tables"]}
    assert tables["pool_windows"]["hidden"] and tables["reservations"]["hidden"]
    assert not tables["requests"]["hidden"]
    # Units render (pint) and the facets configured in the metadata are there.
    status, body = ds.get("/usage/requests")
    assert b"ms" in body and b'data-column="model"' in body


# -- window arithmetic, straight on SQLite with the same SQL ------------------


def _db_with(tmp_path: Path, config_text: str, rows: list[dict], resets: list[dict] = ()) -> tuple[Path, object]:
    path = tmp_path / "usage.db"
    config = config_mod.parse(config_text, tmp_path / "c.toml")
    publish_pools(path, config)
    db = schema.connect(path)
    with db.conn:
        for i, row in enumerate(rows):
            ts = row["at"]
            db.table("requests").insert({"ts": iso_utc(ts), "day": local_day(ts, config.timezone), "pool": row["pool"],
                                         "model": "m", "outcome": "ok", "total_tokens": row["tokens"], "id": i + 1},
                                        columns=schema.REQUEST_COLUMNS)
        for reset in resets:
            db.table("resets").insert({"ts": iso_utc(reset["at"]), "pool": reset["pool"],
                                       "key_id": reset.get("key_id")})
    db.conn.close()
    return path, config


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata", "Pacific/Auckland"])
def test_status_every_window_kind(tmp_path, tz):
    now = datetime.now(timezone.utc)
    text = f"""
timezone = "{tz}"
[pools.d]
limit = 1000
window = "day"
models = ["a"]
[pools.w]
limit = 1000
window = "week"
models = ["b"]
[pools.m]
limit = 1000
window = "month"
models = ["c"]
[pools.r]
limit = 1000
window = "rolling:5h"
models = ["d"]
[pools.t]
window = "day"
models = ["e"]
"""
    config = config_mod.parse(text)
    offsets = [timedelta(minutes=m) for m in (1, 50, 200, 299, 301, 60 * 20, 60 * 30, 60 * 24 * 8, 60 * 24 * 40)]
    rows = [{"at": now - off, "pool": pool, "tokens": 10 + i} for pool in "dwmrt" for i, off in enumerate(offsets)]
    path, _ = _db_with(tmp_path, text, rows)
    status = {s["pool"]: s for s in run_canned(path, "status")}
    for name, pool in config.pools.items():
        start, end = pool.window.bounds(now, config.timezone)
        used = sum(r["tokens"] for r in rows if r["pool"] == name and start <= r["at"] < end)
        s = status[name]
        assert s["used"] == used, name
        if pool.window.is_rolling:
            assert abs(datetime.fromisoformat(s["window_start"]) - start) < timedelta(seconds=5)
            oldest = min(r["at"] for r in rows if r["pool"] == name and r["at"] >= start)
            assert s["resets_at"] == iso_utc(oldest + timedelta(hours=5))
        else:
            assert (s["window_start"], s["resets_at"]) == (iso_utc(start), iso_utc(end)), name
        if pool.limit is None:
            assert s["limit"] is s["remaining"] is s["percentage"] is None
        else:
            assert s["remaining"] == max(pool.limit - used, 0)
            assert s["percentage"] == pytest.approx(round(100 * used / pool.limit, 2))
        assert s["timezone"] == tz


def test_status_after_reset_and_over_limit(tmp_path):
    now = datetime.now(timezone.utc)
    text = """
[pools.p]
limit = 100
window = "month"
models = ["a"]
[pools.q]
limit = 100
window = "rolling:2h"
models = ["b"]
"""
    rows = [{"at": now - timedelta(minutes=m), "pool": pool, "tokens": 70}
            for pool in "pq" for m in (30, 20, 10)]
    resets = [
        {"at": now - timedelta(minutes=25), "pool": "p"},  # the latest pool reset counts
        {"at": now - timedelta(minutes=90), "pool": "p"},
        {"at": now - timedelta(minutes=5), "pool": "p", "key_id": "abc"},  # a key's reset: not the pool's
        {"at": now - timedelta(minutes=15), "pool": "q"},
        {"at": now + timedelta(minutes=60), "pool": "q"},  # in the future: not yet
    ]
    path, _ = _db_with(tmp_path, text, rows, resets)
    status = {s["pool"]: s for s in run_canned(path, "status")}
    assert status["p"]["used"] == 140 and status["p"]["remaining"] == 0 and status["p"]["percentage"] == 140.0
    assert status["p"]["window_start"] == iso_utc(resets[0]["at"])
    assert status["q"]["used"] == 70 and status["q"]["window_start"] == iso_utc(resets[3]["at"])
    assert status["q"]["resets_at"] == iso_utc(rows[5]["at"] + timedelta(hours=2))


@pytest.mark.parametrize("tz", ["UTC", "America/Los_Angeles", "Pacific/Auckland"])
def test_history_days_are_local_days(tmp_path, tz):
    now = datetime.now(timezone.utc)
    text = f"""
timezone = "{tz}"
[pools.p]
models = ["*"]
"""
    rows = [{"at": now - timedelta(hours=h), "pool": "p", "tokens": 1} for h in range(0, 24 * 5, 3)]
    path, config = _db_with(tmp_path, text, rows)
    today = datetime.fromisoformat(local_day(now, config.timezone)).date()
    for days in (1, 2, 4):
        history = run_canned(path, "history", days=str(days))
        first = (today - timedelta(days=days - 1)).isoformat()
        expected = defaultdict(int)
        for r in rows:
            day = local_day(r["at"], config.timezone)
            if day >= first:
                expected[day] += 1
        assert {h["day"]: h["requests"] for h in history} == expected
    assert run_canned(path, "history", days="") == run_canned(path, "history", days="7")


def test_metadata_file_is_the_package_output():
    """datasette-metadata.json is what the package builds, and what docs/build_metadata.py writes."""
    built = json.loads(json.dumps(metadata.build()))
    assert json.loads(METADATA.read_text()) == built, (
        "datasette-metadata.json is stale: .venv/bin/python docs/build_metadata.py > datasette-metadata.json")
    script = subprocess.run([sys.executable, str(ROOT / "docs" / "build_metadata.py")], capture_output=True,
                            text=True, check=True, cwd="/")
    assert json.loads(script.stdout) == built
