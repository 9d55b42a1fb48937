"""What the ledger writes for every reader (status, top, Datasette, other proxies): the configured pools,
their calendar windows, the keys with limits of their own, and reset anchors."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import sqlite_utils

from addon.config import Config, Pool
from addon.windows import iso_utc, utc_now

WINDOW_DAYS_AHEAD = 400


def window_rows(pool: Pool, tz: ZoneInfo, now: datetime, days_ahead: int = WINDOW_DAYS_AHEAD) -> list[dict[str, str]]:
    """Calendar windows of a pool from the current one to `days_ahead` on."""
    if pool.window.is_rolling:
        return []
    rows = []
    start, end = pool.window.bounds(now, tz)
    horizon = now + timedelta(days=days_ahead)
    while start < horizon:
        rows.append({"pool": pool.name, "start": iso_utc(start), "end": iso_utc(end)})
        start, end = pool.window.bounds(end + timedelta(seconds=1), tz)
    return rows


def write_pools(db: sqlite_utils.Database, config: Config, now: datetime | None = None) -> None:
    """Publish the configured pools and their windows for SQL readers (Datasette)."""
    now = now or utc_now()
    stamp = iso_utc(now)
    with db.conn:
        db.execute("DELETE FROM pools")
        db.execute("DELETE FROM pool_windows")
        db.execute("DELETE FROM key_limits")
        db.table("pools").insert_all(
            [
                {
                    "name": pool.name,
                    "limit": pool.limit,
                    "window": pool.window.kind,
                    "rolling_hours": pool.window.rolling_hours,
                    "timezone": config.timezone_name,
                    "models": json.dumps(list(pool.models)),
                    "thresholds": json.dumps(list(pool.thresholds)),
                    "fail": pool.fail,
                    "updated_at": stamp,
                }
                for pool in config.pools.values()
            ]
        )
        # Keys with their own limits, so that status, top and Datasette report them without the config.
        db.table("key_limits").insert_all(
            {"pool": pool, "key_id": rule.key_id, "label": rule.label, "limit": limit}
            for rule in config.keys.values() for pool, limit in rule.limits.items()
        )
        # Keep a day of past windows so "today" still resolves just after start-up.
        for pool in config.pools.values():
            db.table("pool_windows").insert_all(window_rows(pool, config.timezone, now - timedelta(days=1)))


def record_reset(conn: sqlite3.Connection, pool: str, key_id: str | None, note: str | None, now: datetime) -> str:
    """A reset anchor: usage before `now` no longer counts in the pool's (or key's) window."""
    stamp = iso_utc(now)
    conn.execute("INSERT INTO resets (ts, pool, key_id, note) VALUES (?, ?, ?, ?)", (stamp, pool, key_id, note))
    return stamp
