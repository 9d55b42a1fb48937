"""SQLite storage: the tables and their recorded migrations, connections, what a database error means.

The thread that writes the proxy's rows is store/writer.py, the rows that
wait for the database store/spool.py.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
from sqlite_utils import Migrations

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
    "uid": str,  # unique across proxies: `collect` inserts each row once (addon/store/redis_rows.py)
    "origin": str,  # the proxy database a collected row came from
    "transport": str,  # http | sse | websocket
    "conversation": str,  # Responses API conversation id the request continued (estimates of the next turn)
}

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
    # Per-user keys issued by `python -m addon keys create` (addon/store/issued_keys.py):
    # only the SHA-256 of the key is kept; key_id is its first 12 hex digits.
    "issued_keys": (
        {"key_hash": str, "key_id": str, "key_hint": str, "label": str, "created_at": str, "revoked_at": str,
         "note": str},  # note: from POST /admin/keys
        "key_hash",
        [("label",), ("key_id",)],
    ),
    # What OpenAI's organization Usage and Costs APIs counted (addon/tools/reconcile.py).
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
    # How far this database's rows have been published to Redis (addon/store/redis_rows.py).
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
    _opened[db] = file_id(Path(path))
    if not readonly:
        if db.journal_mode != "wal":
            db.enable_wal()
        conn.execute("PRAGMA synchronous = NORMAL")
    return db


# The schema is what these migrations make of a database, in order. Each runs
# once per database and is recorded in `_sqlite_migrations` (sqlite-utils'
# Migrations: simonw/sqlite-migrate 0.2 is only an alias of it, so no extra
# dependency). A change to the schema is a new function at the end; an
# applied one is never edited. The first one brings a database of any
# earlier version up; it reads TABLES, so a column added later goes into
# TABLES and into a new migration that adds it where missing (`add_missing`:
# on a fresh database the first migration has made it already).
MIGRATIONS = Migrations("openai-usage-meter")


def add_missing(db: sqlite_utils.Database, name: str) -> None:
    """Create table `name` of TABLES, or the columns and indexes it lacks."""
    columns, pk, indexes = TABLES[name]
    table = db.table(name)
    if not table.exists():
        table.create(columns, pk=pk)
    else:
        existing = set(table.columns_dict)
        for column, kind in columns.items():
            if column not in existing:
                table.add_column(column, kind)
    for index in indexes:
        table.create_index(list(index), if_not_exists=True, find_unique_name=True)


@MIGRATIONS()
def m001_tables(db: sqlite_utils.Database) -> None:
    """Every table, column and index of the additive schema that came before
    recorded migrations, where missing: a database of any earlier version
    comes up, one made by that code is left as it is."""
    for name in TABLES:
        add_missing(db, name)
    # One row per uid: the collector and spool imports insert with OR IGNORE.
    db.table("requests").create_index(["uid"], index_name="idx_requests_uid", unique=True, if_not_exists=True)


@MIGRATIONS()
def m002_alerts_dedupe(db: sqlite_utils.Database) -> None:
    """Each alert fires once across proxy processes: INSERT OR IGNORE on this key (formerly made by alerts.py)."""
    # A database that never had the index may hold an alert twice: the first one stays.
    db.execute("DELETE FROM alerts WHERE dedupe IS NOT NULL AND id NOT IN"
               " (SELECT MIN(id) FROM alerts WHERE dedupe IS NOT NULL GROUP BY dedupe)")
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS alerts_dedupe ON alerts(dedupe)")


def migrate(db: sqlite_utils.Database) -> None:
    """Bring the schema up to date: apply the migrations the database has not recorded.

    The single entry point for every process that opens the database; one
    read when it is up to date. The migrations run in one IMMEDIATE
    transaction: of several processes migrating one file at once (a proxy
    starting beside a command), one applies them and records them, the others
    wait for the write lock (busy timeout) and then find nothing pending. A
    lock held past the busy timeout (a file switching to WAL, a long index
    build) is tried again.
    """
    for attempt in range(4):
        try:
            if MIGRATIONS.pending(db):
                _apply_all(db)
            return
        except sqlite3.OperationalError as exc:
            if attempt == 3 or "locked" not in str(exc):
                raise
            time.sleep(0.25 * (attempt + 1))


def _apply_all(db: sqlite_utils.Database) -> None:
    if db.conn.in_transaction:  # the caller's transaction: its own lock (each migration in a savepoint)
        MIGRATIONS.apply(db)
        return
    with immediate(db.conn):
        MIGRATIONS.apply(db)  # reads what is pending again, under the lock


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock up front, committed at the end, rolled back on any error.

    A deferred BEGIN that reads and then writes fails at once ("database is
    locked") when another process (a ledger, a second proxy) wrote in
    between; IMMEDIATE waits for the lock (busy timeout) instead.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.commit()
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


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
    """(device, inode) of a file, None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


# The file each connection opened (connect()), for `moved`.
_opened: weakref.WeakKeyDictionary[sqlite_utils.Database, tuple[int, int] | None] = weakref.WeakKeyDictionary()


def moved(db: sqlite_utils.Database, path: str | Path) -> bool:
    """True when the file at `path` is no longer the one `db` has open (deleted or moved
    away): writing on would go into a file nobody can see any more."""
    return file_id(Path(path)) != _opened.get(db)
