"""SQLite storage: schema, migrations and the single writer thread.

mitmproxy runs every connection on one asyncio loop, so hooks never touch
SQLite: they hand finished rows to `Writer.put`, and one thread writes them
in batches with sqlite-utils. If the database is unavailable, rows wait in a
bounded spool and are written when it is back.
"""

from __future__ import annotations

import glob
import json
import logging
import os
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
    # Second round (docs: README "Costs"): what OpenAI bills separately.
    "audio_input_tokens": int,  # part of input_tokens
    "audio_output_tokens": int,  # part of output_tokens
    "image_input_tokens": int,  # part of input_tokens
    "image_output_tokens": int,  # part of output_tokens
    "cache_write_tokens": int,  # part of input_tokens
    "cached_audio_tokens": int,  # part of cached_tokens and audio_input_tokens (Realtime)
    "tool_calls": str,  # JSON object: hosted tool type -> calls
    "characters": int,  # TTS input characters
    "images": int,  # images of per-image models (DALL-E)
    "image_size": str,  # images: size and quality asked (DALL-E prices depend on them)
    "image_quality": str,
    "processing": str,  # standard | batch | flex | priority | ... as billed
    "reported_total_tokens": int,  # OpenAI's own total_tokens
    "cost_status": str,  # priced | free | unknown_price | no_usage
    "uid": str,  # unique across proxies: `collect` inserts each row once (addon/redis_rows.py)
    "origin": str,  # the proxy database a collected row came from
    "transport": str,  # http | sse | websocket
    "conversation": str,  # Responses API conversation id the request continued (estimates of the next turn)
}

# Longest text kept per column: every text a request or an answer can put in a
# row is cut here (store.bound_columns, applied to every row written), so a
# 2 MB `model` costs 200 bytes. A text column missing here gets TEXT_LIMIT.
COLUMN_LIMITS: dict[str, int] = {
    "ts": 32,
    "day": 10,
    "host": 255,
    "method": 16,
    "path": 500,
    "endpoint": 100,
    "model": 200,
    "requested_model": 200,
    "pool": 100,
    "outcome": 16,
    "key_id": 16,
    "key_hint": 16,
    "project": 200,
    "request_id": 200,
    "service_tier": 64,
    "user_agent": 200,
    "error": 500,
    "response_id": 200,
    "label": 200,
}
TEXT_LIMIT = 1000


def bound_columns(row: dict[str, Any]) -> None:
    """Cut every text value of a row to its column's limit, in place."""
    for key, value in row.items():
        if isinstance(value, str):
            limit = COLUMN_LIMITS.get(key, TEXT_LIMIT)
            if len(value) > limit:
                row[key] = value[: limit - 1] + "…"


REQUEST_INDEXES: list[tuple[str, ...]] = [
    ("ts",),
    ("day", "pool"),
    ("pool", "ts"),
    ("key_id", "ts"),
    ("model",),
    ("outcome",),
    ("response_id",),
    ("transport",),
    ("conversation",),
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
    # Keys with their own limit in a pool, from the config's [keys] (written with `pools`).
    "key_limits": ({"pool": str, "key_id": str, "label": str, "limit": int}, ("pool", "key_id"), []),
    # Manual resets: usage before `ts` no longer counts in its window.
    "resets": ({"id": int, "ts": str, "pool": str, "key_id": str, "note": str}, "id", [("pool", "ts")]),
    # Admission reservations of requests in flight (shared by all proxies).
    "reservations": (
        {"id": int, "pool": str, "key_id": str, "tokens": int, "created": float, "expires": float, "owner": str,
         "spare": int},  # spare: tokens of the lease no request holds (as of its owner's last transaction)
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
            "dedupe": str,  # pool|key|window_start|threshold, unique
        },
        "id",
        [("pool", "window_start")],
    ),
    # Per-user keys issued by `python -m addon keys create` (addon/issued_keys.py):
    # only the SHA-256 of the key is kept; key_id is its first 12 hex digits.
    "issued_keys": (
        {"key_hash": str, "key_id": str, "key_hint": str, "label": str, "created_at": str, "revoked_at": str,
         "note": str},  # note: from POST /admin/keys
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
    # How far this database's rows have been published to Redis (addon/redis_rows.py).
    "redis_outbox": ({"stream": str, "last_id": int, "origin": str}, "stream", []),
    "openai_costs": (
        {"start": str, "end": str, "line_item": str, "amount_usd": float, "currency": str, "fetched_at": str},
        ("start", "line_item"),
        [],
    ),
}


def create_private(path: str | Path) -> None:
    """Create `path` readable by its owner only (0600) if it does not exist.

    SQLite gives the WAL and shared-memory files the database's mode, so they
    are private too. An existing file keeps the mode its owner gave it.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        pass  # a directory that is not there (yet): sqlite3 reports it


def open_private(path: str | Path, mode: str = "a"):
    """A text file opened for appending, created 0600 (spool files, the body log)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), mode, encoding="utf-8")


def connect(path: str | Path, *, readonly: bool = False) -> sqlite_utils.Database:
    """Open the database the way every part of the project should."""
    if readonly:
        conn = sqlite3.connect(
            f"file:{Path(path)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
    else:
        create_private(path)
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
    # One row per uid: the collector and spool imports insert with OR IGNORE.
    db.table("requests").create_index(["uid"], index_name="idx_requests_uid", unique=True, if_not_exists=True)


def insert_rows(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """Insert rows in the caller's transaction.

    A row may carry `_reservation`: (reservation id, tokens, owner) of the
    admission it was counted under. Those tokens leave the reservation in the
    same transaction, so a request's tokens are always counted exactly once,
    as reserved or as used, by every proxy process. (The owner guards against
    a reservation that expired and whose id SQLite gave to another process.)
    """
    count_once(db, rows)
    released: dict[tuple[int, str], int] = {}
    private = False
    for row in rows:
        if "uid" not in row:  # kept by a row that waits in the spool and is retried
            row["uid"] = os.urandom(12).hex()
        bound_columns(row)
        if "_reservation" in row:
            private = True
            held = row["_reservation"]
            if held:
                reservation, tokens, owner = held
                released[(reservation, owner)] = released.get((reservation, owner), 0) + tokens
    clean = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows] if private else rows
    db.table("requests").insert_all(clean, batch_size=500, columns=REQUEST_COLUMNS, ignore=True)
    if released:
        db.conn.executemany("UPDATE reservations SET tokens = MAX(tokens - ?, 0) WHERE id = ? AND owner = ?",
                            [(tokens, *scope) for scope, tokens in released.items()])


# Columns that carry usage or its price: emptied in a row whose response was counted already.
USAGE_COLUMNS = (
    "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "audio_seconds",
    "cost_usd", "audio_input_tokens", "audio_output_tokens", "image_input_tokens", "image_output_tokens",
    "cache_write_tokens", "reported_total_tokens", "tool_calls", "characters", "images",
)
COUNTED_BEFORE = "usage already counted for this response id"


def count_once(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """A response's usage counts once, whichever proxy process recorded it
    first and whenever: later rows with its id (background polls, retrievals,
    a finished batch read again) keep no usage. In the caller's write
    transaction, so two processes cannot both count it."""
    ids = {row["response_id"] for row in rows if row.get("response_id") and row.get("total_tokens") is not None}
    if not ids:
        return
    seen: set[str] = set()
    listed = list(ids)
    for start in range(0, len(listed), 500):
        part = listed[start : start + 500]
        seen.update(r[0] for r in db.conn.execute(
            f"SELECT DISTINCT response_id FROM requests WHERE response_id IN ({','.join('?' * len(part))})"
            " AND total_tokens IS NOT NULL", part))
    for row in rows:
        rid = row.get("response_id")
        if not rid or row.get("total_tokens") is None:
            continue
        if rid in seen:
            for column in USAGE_COLUMNS:
                if column in row:
                    row[column] = None
            row["error"] = row.get("error") or COUNTED_BEFORE
            if "cost_status" in row:  # priced before the usage was taken away; reprice says the same
                row["cost_status"] = "no_usage"
        else:
            seen.add(rid)


# SQLite result codes (primary part) that mean "the database is not
# available right now": rows wait in the spool and are retried. Any other
# error is a problem with the rows themselves (see Writer._write_apart).
TRANSIENT_ERRORS = frozenset(
    {
        "SQLITE_BUSY",
        "SQLITE_LOCKED",
        "SQLITE_READONLY",
        "SQLITE_FULL",
        "SQLITE_IOERR",
        "SQLITE_CANTOPEN",
        "SQLITE_PERM",
        "SQLITE_PROTOCOL",
        "SQLITE_NOLFS",
        "SQLITE_NOTADB",
        "SQLITE_CORRUPT",
        "SQLITE_AUTH",
    }
)


def is_transient(exc: BaseException) -> bool:
    """True when an error is about the database being unavailable, not the data."""
    if isinstance(exc, OSError):
        return True
    name = getattr(exc, "sqlite_errorname", None)
    if not name:
        return False
    return "_".join(name.split("_")[:2]) in TRANSIENT_ERRORS


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None when it is missing: tells a moved or
    deleted database from the one a connection has open."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Writer:
    """One thread, one connection, batched inserts into `requests`.

    Each batch is one transaction, so readers never see half of one. When the
    database cannot be written (read-only, disk full, locked past the busy
    timeout, directory gone), rows wait in a bounded in-memory spool and are
    retried every `retry_interval` seconds; a graceful stop with rows still
    spooled saves them next to the database (`usage.db.spool-PID.jsonl`) and
    the next writer that opens the database imports them. Each change of
    state is logged once. A database file that is deleted or moved while
    open is noticed before the next write (inode check) and a new file is
    created at the configured path, instead of writing into the lost inode.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        prepare: Callable[[list[dict[str, Any]]], None] | None = None,
        after_commit: Callable[[sqlite_utils.Database, list[dict[str, Any]]], None] | None = None,
        spool_limit: int = 20_000,
        retry_interval: float = 1.0,
        linger: float = 0.02,
        busy_linger: float = 0.05,
        on_drop: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.prepare = prepare
        self.after_commit = after_commit
        self.on_drop = on_drop  # rows that will never be written (their reservations can go)
        self.spool_limit = max(int(spool_limit), 1)
        self.retry_interval = retry_interval
        # Seconds a batch waits for more rows (bounds what kill -9 can lose):
        # `linger` for a lone row, `busy_linger` while rows keep coming, where
        # every commit saved is CPU (and GIL time) given back to the proxy.
        self.linger = linger
        self.busy_linger = max(busy_linger, linger)
        self._last_batch = (0.0, 0)  # (time.monotonic() of the last commit, rows in it)
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._spool: deque[dict[str, Any]] = deque()
        self._pending = 0
        self._idle = threading.Condition()
        self._db: sqlite_utils.Database | None = None
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the open database
        self._healthy: bool | None = None
        self._last_attempt = 0.0
        self._outage_dropped = 0
        self._warned_columns: set[str] = set()
        self._claimed: list[Path] = []  # spool files of an earlier run, being imported
        self.written = 0  # rows committed
        self.spooled = 0  # rows that had to wait in memory
        self.dropped = 0  # rows lost because the spool was full
        self.recovered = 0  # spooled rows written later
        self.rejected = 0  # rows SQLite refused for what they contain
        self.reopened = 0  # times the database file vanished and was recreated
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    # -- called from the event loop -------------------------------------
    def put(self, row: dict[str, Any]) -> None:
        with self._idle:
            # Bound memory even when the writer thread is stuck (a lock held
            # past the busy timeout): the queue counts against the spool.
            if self._pending >= self.spool_limit * 2 + 1000:
                self.dropped += 1
                self._outage_dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("usage: writer is %d rows behind; dropped %d rows so far", self._pending, self.dropped)
                self._dropped([row])
                return
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

    def stats(self) -> dict[str, int]:
        return {
            "written": self.written,
            "spooled": self.spooled,
            "spool": len(self._spool),
            "dropped": self.dropped,
            "recovered": self.recovered,
            "rejected": self.rejected,
            "reopened": self.reopened,
        }

    # -- writer thread ---------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            timeout = self.retry_interval if self._spool else None
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                batch: list[dict[str, Any]] = []
            else:
                batch = []
                if first is None:
                    stop = True
                else:
                    batch.append(first)
                    # Linger a moment so busy proxies commit rows in groups
                    # (one transaction per row costs more than the row). A
                    # sleep, not a get() with a timeout: rows put meanwhile
                    # must not wake this thread (and take the GIL) one by one.
                    when, size = self._last_batch
                    busy = size > 1 and time.monotonic() - when < 2 * self.busy_linger
                    if busy or self.linger:
                        time.sleep(self.busy_linger if busy else self.linger)
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
            if taken:
                self._last_batch = (time.monotonic(), taken)
            if self.prepare and batch:
                try:
                    self.prepare(batch)
                except Exception:  # never lose rows over a pricing bug
                    log.exception("usage: preparing rows failed")
            try:
                self._write(batch, force=stop)
            except Exception:  # a bug here must not kill the thread (rows would pile up)
                log.exception("usage: writing rows failed")
                self._spool_rows(batch, None)
            with self._idle:
                self._pending -= taken
                self._idle.notify_all()
        if self._spool:
            self._save_spool()
        self._drop_connection()

    def _open(self) -> sqlite_utils.Database:
        if self._db is not None and file_id(self.path) != self._file:
            # Deleted or moved: the connection would keep writing into a file
            # nobody can see any more. Its WAL is still the one at the old
            # path: copy it into the (moved) file, then start a new database.
            log.warning("usage: database %s was deleted or moved; creating a new one", self.path)
            self.reopened += 1
            try:
                self._db.execute("PRAGMA wal_checkpoint(FULL)")
            except sqlite3.Error as exc:
                log.warning("usage: could not checkpoint the moved database (%s)", exc)
            self._drop_connection()
            if not self.path.exists():
                # A new database must not pick up the old one's WAL.
                for suffix in ("-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        if self._db is None:
            db = connect(self.path)
            try:
                migrate(db)
                self._file = file_id(self.path)
            except BaseException:
                db.conn.close()
                raise
            self._db = db
            self._import_spool_files()
        return self._db

    def _write(self, batch: list[dict[str, Any]], force: bool = False) -> None:
        if self._healthy is False and not force and time.monotonic() - self._last_attempt < self.retry_interval:
            self._spool_rows(batch, None)  # not yet time to retry
            return
        self._last_attempt = time.monotonic()
        try:
            db = self._open()
            if self._spool:  # older rows first, in transactions of bounded size
                while self._spool:
                    part = [self._spool.popleft() for _ in range(min(5000, len(self._spool)))]
                    try:
                        self._commit(db, part)
                    except BaseException:
                        self._spool.extendleft(reversed(part))
                        raise
                    self.recovered += len(part)
                self._back()
            if batch:
                self._commit(db, batch)
        except (sqlite3.Error, OSError, ValueError, TypeError, OverflowError) as exc:
            self._drop_connection()
            if is_transient(exc):
                self._spool_rows(batch, exc)
            else:  # a row SQLite refuses must not hold up the others forever
                rows = list(self._spool) + batch
                self._spool.clear()
                self._write_apart(rows, exc)
            return
        if self._healthy is None:
            self._healthy = True
        for claimed in self._claimed:  # rows saved by an earlier run are committed now
            try:
                claimed.unlink(missing_ok=True)
            except OSError as exc:  # the batch is committed: it must not be spooled again
                log.warning("usage: could not remove %s (%s); its rows are written, delete it by hand", claimed, exc)
        self._claimed.clear()

    def _commit(self, db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
        # One transaction per batch (insert_all alone commits every 500 rows),
        # write lock first: a deferred BEGIN that reads the schema and then
        # writes fails at once ("database is locked") when another process
        # (a ledger, a second proxy) wrote in between; IMMEDIATE waits instead.
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            insert_rows(db, rows)
            db.conn.commit()
        except BaseException:
            if db.conn.in_transaction:
                db.conn.rollback()
            raise
        self.written += len(rows)
        if self.after_commit:
            try:
                self.after_commit(db, rows)
            except Exception:
                log.exception("usage: post-commit hook failed")

    def _write_apart(self, batch: list[dict[str, Any]], exc: BaseException) -> None:
        """A batch SQLite refused for its content: keep every row that can be kept."""
        log.warning("usage: a batch of %d rows was refused (%s); writing them one by one", len(batch), exc)
        for row in batch:
            clean = self._sanitize(row)
            try:
                self._commit(self._open(), [clean])
            except (sqlite3.Error, OSError, ValueError, TypeError, OverflowError) as row_exc:
                self._drop_connection()
                if is_transient(row_exc):
                    self._spool_rows([clean], row_exc)
                else:
                    self.rejected += 1
                    log.error("usage: dropped a row SQLite refuses (%s): %s", row_exc, row.get("path"))
                    self._dropped([row])

    def _dropped(self, rows: list[dict[str, Any]]) -> None:
        if self.on_drop is not None:
            try:
                self.on_drop(rows)
            except Exception:
                log.exception("usage: drop hook failed")

    def _sanitize(self, row: dict[str, Any]) -> dict[str, Any]:
        clean: dict[str, Any] = {}
        for key, value in row.items():
            if key.startswith("_"):  # private (a reservation): not a column, kept as is
                clean[key] = value
                continue
            if key not in REQUEST_COLUMNS:
                if key not in self._warned_columns:
                    self._warned_columns.add(key)
                    log.warning("usage: rows carry a column %r that table requests does not have; ignored", key)
                continue
            if isinstance(value, bool):
                value = int(value)
            elif isinstance(value, int):
                value = value if -(2**63) <= value < 2**63 else str(value)
            elif value is not None and not isinstance(value, (str, float, bytes)):
                value = str(value)
            if isinstance(value, str):
                value = value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be bound
            clean[key] = value
        return clean

    def _back(self) -> None:
        if self._healthy is False:
            log.warning(
                "usage: database %s is writable again; wrote the spooled rows (%d spooled, %d dropped since it failed)",
                self.path,
                self.spooled,
                self._outage_dropped,
            )
        self._healthy = True
        self._outage_dropped = 0

    def _spool_rows(self, batch: Iterable[dict[str, Any]], exc: BaseException | None) -> None:
        if self._healthy is not False:
            reason = exc if exc is not None else "writer error"
            log.warning(
                "usage: cannot write to %s (%s); keeping up to %d rows in memory until it is back",
                self.path,
                reason,
                self.spool_limit,
            )
            self._healthy = False
        for row in batch:
            if len(self._spool) >= self.spool_limit:
                self._dropped([self._spool.popleft()])
                self.dropped += 1
                self._outage_dropped += 1
                if self._outage_dropped == 1 or self._outage_dropped % 1000 == 0:
                    log.error("usage: spool full (%d rows); dropped %d rows so far", self.spool_limit, self.dropped)
            self._spool.append(row)
            self.spooled += 1

    def _spool_file(self) -> Path:
        return self.path.with_name(f"{self.path.name}.spool-{os.getpid()}.jsonl")

    def _save_spool(self) -> None:
        """Shutdown with the database still unavailable: keep the rows on disk."""
        target = self._spool_file()
        try:
            with open_private(target) as handle:
                for row in self._spool:
                    # Reservations are not carried over: this process's ones expire on their own.
                    public = {k: v for k, v in row.items() if not k.startswith("_")}
                    handle.write(json.dumps(public, default=str) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            log.error("usage: %d rows could not be written to %s and are lost (%s)", len(self._spool), self.path, exc)
            return
        log.warning("usage: %d rows could not be written to %s; saved them in %s", len(self._spool), self.path, target)
        self._spool.clear()

    def _import_spool_files(self) -> None:
        """Rows a previous run saved at shutdown go back in the spool (written next)."""
        for path in sorted(self.path.parent.glob(f"{glob.escape(self.path.name)}.spool-*.jsonl")):
            claimed = path.with_name(path.name + f".importing-{os.getpid()}")
            try:
                path.rename(claimed)  # another proxy on the same database may race us
                lines = claimed.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            rows = []
            for line in lines:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(row, dict):
                    rows.append(row)
            # Written before this run's rows; the file goes once they are committed.
            self._spool.extendleft(reversed(rows))
            self.spooled += len(rows)
            self._claimed.append(claimed)
            log.warning("usage: importing %d rows saved in %s", len(rows), path)

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.conn.close()
            except sqlite3.Error:
                pass
            self._db = None
            self._file = None
