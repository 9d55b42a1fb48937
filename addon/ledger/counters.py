"""Tokens used in the current window of each pool (and key), kept incrementally for the SQLite ledger.

The counters remember the last `requests.id` they have seen and add newer
rows (from every process) to their totals; a new window or a reset
recomputes a total once from the database (pool_status.used_in, the one
"used" every reader shares). Rolling windows keep their rows' (moment,
tokens) to drop them as they age out.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from addon.config import Config, Pool
from addon.ledger import pool_status
from addon.ledger.pool_status import ScopeKey, parse_ts
from addon.windows import iso_utc


@dataclass(slots=True)
class Counter:
    """Tokens used in the current window of one pool (and key)."""

    start: datetime  # effective start: window start or a later reset
    end: datetime
    window_start: datetime
    total: int = 0
    # Rolling windows: (epoch, tokens) of counted rows, oldest first.
    events: deque = field(default_factory=deque)


class WindowCounters:
    """The counters of one ledger's pools, read on its connection (its thread)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.resets: dict[ScopeKey, list[datetime]] = {}
        self._counters: dict[ScopeKey, Counter] = {}
        self._last_id = 0
        self._last_reset_id: int | None = None

    def clear(self) -> None:
        """Another connection (a moved file): count again from its rows."""
        self._counters.clear()
        self._last_id = 0
        self._last_reset_id = None

    def refresh(self, conn: sqlite3.Connection) -> None:
        """Take in resets and rows written since the last look (any process)."""
        (reset_id,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM resets").fetchone()
        if reset_id != self._last_reset_id:
            self.resets = pool_status.latest_resets(conn)
            self._last_reset_id = reset_id
            self._counters.clear()  # recompute with the new anchors
        if not self._counters:
            (self._last_id,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()
            return
        rows = conn.execute(
            "SELECT id, ts, pool, key_id, total_tokens FROM requests WHERE id > ? ORDER BY id", (self._last_id,)
        ).fetchall()
        if rows:
            self._last_id = rows[-1][0]
        for _id, ts, pool, key, tokens in rows:
            if tokens is None:
                continue
            try:
                moment = parse_ts(ts)
            except (TypeError, ValueError):
                continue
            for scope in ((pool, None), (pool, key)) if key else ((pool, None),):
                counter = self._counters.get(scope)
                if counter is not None and counter.start <= moment < counter.end:
                    counter.total += tokens
                    if self._is_rolling(pool):
                        counter.events.append((moment.timestamp(), tokens))

    def _is_rolling(self, pool_name: str) -> bool:
        pool = self.config.pools.get(pool_name)
        return bool(pool and pool.window.is_rolling)

    def get(self, conn: sqlite3.Connection, pool: Pool, key_id: str | None, now: datetime) -> Counter:
        """The counter of a pool (and key) as of `now` (after `refresh`)."""
        scope = (pool.name, key_id)
        counter = self._counters.get(scope)
        window = pool.window
        if counter is not None:
            if window.is_rolling:
                # Slide: drop what fell out of the window.
                horizon = (now - timedelta(hours=window.rolling_hours or 0)).timestamp()
                while counter.events and counter.events[0][0] < horizon:
                    counter.total -= counter.events.popleft()[1]
                counter.end = now + timedelta(days=3650)
                return counter
            if now < counter.end:
                return counter
        counter = self._load(conn, pool, key_id, now)
        self._counters[scope] = counter
        return counter

    def bounds(self, pool: Pool, key_id: str | None, now: datetime) -> tuple[datetime, datetime, datetime]:
        """(counting start, window end, window start) with resets applied."""
        return pool_status.counting_bounds(pool.window, self.config.timezone, now, self.resets, pool.name, key_id)

    def _load(self, conn: sqlite3.Connection, pool: Pool, key_id: str | None, now: datetime) -> Counter:
        start, end, window_start = self.bounds(pool, key_id, now)
        counter = Counter(start, end, window_start)
        if pool.window.is_rolling:
            counter.end = now + timedelta(days=3650)  # open-ended; rows are evicted as they age
        sql = "SELECT ts, total_tokens FROM requests WHERE pool = ? AND ts >= ? AND ts < ? AND total_tokens IS NOT NULL"
        params: list[Any] = [pool.name, iso_utc(start), iso_utc(end if not pool.window.is_rolling else counter.end)]
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        if pool.window.is_rolling:
            for ts, tokens in conn.execute(sql + " ORDER BY ts", params):
                counter.events.append((parse_ts(ts).timestamp(), tokens))
                counter.total += tokens
        else:
            counter.total = pool_status.used_in(conn, pool.name, key_id, start, end)
        return counter
