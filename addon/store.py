"""SQLite storage: schema, migrations and the single writer thread.

mitmproxy runs every connection on one asyncio loop, so hooks never touch
SQLite: they hand finished rows to `Writer.put`, and one thread writes them
in batches with sqlite-utils. If the database is unavailable, rows wait in a
bounded spool and are written when it is back.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sqlite_utils

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000

# Columns of `requests`, in order. The contract's columns first, then ours.
REQUEST_COLUMNS: dict[str, type] = {
    "id": int,
    "ts": str,
    "day": str,
    "host": str,
    "method": str,
    "path": str,
    "endpoint": str,
    "model": str,
    "pool": str,
    "status": int,
    "outcome": str,
    "streamed": int,
    "input_tokens": int,
    "cached_tokens": int,
    "output_tokens": int,
    "reasoning_tokens": int,
    "total_tokens": int,
    "cost_usd": float,
    "latency_ms": float,
    "ttfb_ms": float,
    "key_id": str,
    "key_hint": str,
    "project": str,
    "request_id": str,
    "service_tier": str,
    "user_agent": str,
    "error": str,
    # Beyond the contract:
    "response_id": str,  # chatcmpl-/resp_ id, counts background responses once
    "audio_seconds": float,  # whisper-1 bills by duration
    "label": str,  # who the key belongs to (config [keys] or issued keys)
    "requested_model": str,
}

REQUEST_INDEXES: list[tuple[str, ...]] = [
    ("ts",),
    ("day", "pool"),
    ("pool", "ts"),
    ("key_id", "ts"),
    ("model",),
    ("outcome",),
    ("response_id",),
]

# Every table of the database: name -> (columns, pk, indexes).
TABLES: dict[str, tuple[dict[str, type], str | tuple[str, ...] | None, list[tuple[str, ...]]]] = {
    "requests": (REQUEST_COLUMNS, "id", REQUEST_INDEXES),
    # The configured pools, written by the proxy at start-up (and by the CLI).
    "pools": (
        {
            "name": str,
            "limit": int,  # NULL: track only
            "window": str,  # day | week | month | rolling:Nh
            "rolling_hours": int,  # for rolling windows, else NULL
            "timezone": str,
            "models": str,  # JSON list of patterns
            "thresholds": str,  # JSON list of alert percentages
            "fail": str,  # open | closed
            "updated_at": str,
        },
        "name",
        [],
    ),
    # Calendar windows of each pool (start <= now < end), precomputed in the
    # configured time zone so SQL (Datasette) needs no time zone arithmetic.
    "pool_windows": ({"pool": str, "start": str, "end": str}, ("pool", "start"), [("pool", "end")]),
    # Manual resets: usage before `ts` no longer counts in its window.
    "resets": ({"id": int, "ts": str, "pool": str, "key_id": str, "note": str}, "id", [("pool", "ts")]),
    # Admission reservations of requests in flight (shared by all proxies).
    "reservations": (
        {"id": int, "pool": str, "key_id": str, "tokens": int, "created": float, "expires": float, "owner": str},
        "id",
        [("pool",), ("expires",)],
    ),
    # Alerts fired, one per pool, window and threshold (and key, for key limits).
    "alerts": (
        {
            "id": int,
            "ts": str,
            "pool": str,
            "key_id": str,
            "window_start": str,
            "threshold": float,
            "used": int,
            "limit": int,
            "message": str,
            "delivered": int,
            "attempts": int,
            "last_error": str,
        },
        "id",
        [("pool", "window_start")],
    ),
    # Per-user keys issued by `python -m addon keys create` (addon/issued_keys.py):
    # only the SHA-256 of the key is kept; key_id is its first 12 hex digits.
    "issued_keys": (
        {"key_hash": str, "key_id": str, "key_hint": str, "label": str, "created_at": str, "revoked_at": str},
        "key_hash",
        [("label",), ("key_id",)],
    ),
    # What OpenAI's organization Usage and Costs APIs counted (addon/reconcile.py).
    "openai_usage": (
        {
            "bucket_width": str,  # 1d | 1h
            "start": str,  # bucket start, ISO 8601 UTC
            "end": str,
            "model": str,  # "" when OpenAI gave none
            "requests": int,
            "input_tokens": int,
            "cached_tokens": int,
            "output_tokens": int,
            "fetched_at": str,
        },
        ("bucket_width", "start", "model"),
        [("start",)],
    ),
    "openai_costs": (
        {"start": str, "end": str, "line_item": str, "amount_usd": float, "currency": str, "fetched_at": str},
        ("start", "line_item"),
        [],
    ),
}


def connect(path: str | Path, *, readonly: bool = False) -> sqlite_utils.Database:
    """Open the database the way every part of the project should."""
    if readonly:
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db = sqlite_utils.Database(conn)
    if not readonly:
        if db.journal_mode != "wal":
            db.enable_wal()
        conn.execute("PRAGMA synchronous = NORMAL")
    return db


def migrate(db: sqlite_utils.Database) -> None:
    """Create missing tables, columns and indexes. Idempotent."""
    for name, (columns, pk, indexes) in TABLES.items():
        table = db.table(name)
        if not table.exists():
            table.create(columns, pk=pk, if_not_exists=True)
        else:
            existing = set(table.columns_dict)
            for column, kind in columns.items():
                if column not in existing:
                    table.add_column(column, kind)
        for index in indexes:
            table.create_index(list(index), if_not_exists=True, find_unique_name=True)


def insert_rows(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """Insert rows in the caller's transaction.

    A row may carry `_reservation` (the admission reservation it settles):
    it is deleted in the same transaction, so a request's tokens are always
    counted exactly once, as reserved or as used, by every proxy process.
    """
    reservations = [row["_reservation"] for row in rows if row.get("_reservation")]
    private = reservations or any("_reservation" in row for row in rows)
    clean = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows] if private else rows
    db.table("requests").insert_all(clean, batch_size=500, columns=REQUEST_COLUMNS)
    for start in range(0, len(reservations), 500):
        part = reservations[start : start + 500]
        db.execute(f"DELETE FROM reservations WHERE id IN ({','.join('?' * len(part))})", part)


class Writer:
    """One thread, one connection, batched inserts into `requests`."""

    def __init__(
        self,
        path: str | Path,
        *,
        prepare: Callable[[list[dict[str, Any]]], None] | None = None,
        after_commit: Callable[[sqlite_utils.Database, list[dict[str, Any]]], None] | None = None,
        spool_limit: int = 100_000,
        retry_interval: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.prepare = prepare
        self.after_commit = after_commit
        self.spool_limit = spool_limit
        self.retry_interval = retry_interval
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._spool: deque[dict[str, Any]] = deque()
        self._pending = 0
        self._idle = threading.Condition()
        self._db: sqlite_utils.Database | None = None
        self._healthy: bool | None = None
        self.written = 0
        self.spooled = 0
        self.dropped = 0
        self.recovered = 0
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    # -- called from the event loop -------------------------------------
    def put(self, row: dict[str, Any]) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row put so far is written (or spooled)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def spool_size(self) -> int:
        return len(self._spool)

    # -- writer thread ---------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            timeout = self.retry_interval if self._spool else None
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = None
                batch: list[dict[str, Any]] = []
            else:
                batch = []
                if first is None:
                    stop = True
                else:
                    batch.append(first)
                    while len(batch) < 5000:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is None:
                            stop = True
                            break
                        batch.append(item)
            taken = len(batch)
            if self.prepare and batch:
                try:
                    self.prepare(batch)
                except Exception:  # never lose rows over a pricing bug
                    log.exception("usage: preparing rows failed")
            self._write(batch)
            if stop and self._spool:
                self._write([])  # last attempt at shutdown
            with self._idle:
                self._pending -= taken
                self._idle.notify_all()
        if self._spool:
            log.error("usage: %d rows could not be written to %s and are lost", len(self._spool), self.path)
        if self._db is not None:
            self._db.conn.close()

    def _open(self) -> sqlite_utils.Database:
        if self._db is None:
            db = connect(self.path)
            migrate(db)
            self._db = db
        return self._db

    def _write(self, batch: list[dict[str, Any]]) -> None:
        rows = list(self._spool) + batch if self._spool else batch
        if not rows:
            return
        try:
            db = self._open()
            with db.conn:
                insert_rows(db, rows)
        except (sqlite3.Error, OSError) as exc:
            self._drop_connection()
            self._spool_rows(batch, exc)
            return
        if self._spool:
            self.recovered += len(self._spool)
            log.warning("usage: database %s is writable again; wrote %d spooled rows", self.path, len(self._spool))
            self._spool.clear()
        self.written += len(rows)
        if self._healthy is False:
            pass
        self._healthy = True
        if self.after_commit:
            try:
                self.after_commit(db, rows)
            except Exception:
                log.exception("usage: post-commit hook failed")

    def _spool_rows(self, batch: Iterable[dict[str, Any]], exc: BaseException) -> None:
        if self._healthy is not False:
            log.warning("usage: cannot write to %s (%s); keeping rows in memory until it is back", self.path, exc)
            self._healthy = False
        for row in batch:
            if len(self._spool) >= self.spool_limit:
                self._spool.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("usage: spool full (%d rows); dropped %d oldest rows so far", self.spool_limit, self.dropped)
            self._spool.append(row)
            self.spooled += 1

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.conn.close()
            except sqlite3.Error:
                pass
            self._db = None
