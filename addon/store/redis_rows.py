"""Rows past one machine: proxies publish their rows to a Redis Stream, `collect` writes them into one SQLite.

Each proxy keeps writing its own database first; that database is the outbox.
A publisher thread reads rows committed since its cursor (table `redis_outbox`),
adds them to the stream `usage:rows` in one pipeline and then moves the cursor.
While Redis is away the rows simply wait in SQLite, and a crash between the
XADD and the cursor update only publishes some rows twice, which the collector
ignores: every row carries a `uid`, unique in the central database.

The collector reads the stream in a consumer group and acknowledges entries
only after the transaction that inserted them has committed (`INSERT OR IGNORE`
on `uid`), so a collector killed mid-batch re-reads its pending entries at the
next start: nothing is inserted twice and nothing is lost.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from addon.store import schema
from addon.windows import iso_utc, utc_now
from addon.worker import FailureLog, Worker

log = logging.getLogger(__name__)

STREAM = "usage:rows"
GROUP = "collectors"
# The stream keeps about this many rows for collectors that fall behind
# (XADD MAXLEN ~): at ~1 KB a row, about 1 GB of Redis memory at most.
STREAM_MAXLEN = 1_000_000
PUBLISH_BATCH = 500
PUBLISH_INTERVAL = 1.0  # seconds between looks at the local database
PASSWORD_ENV = "USAGE_REDIS_PASSWORD"
REPUBLISH_HOURS = 24  # after Redis lost its data, rows of this many hours are published again


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def connect(url: str, *, timeout: float = 2.0) -> redis.Redis:
    """A client for `url` (redis:// or rediss://); the password may come from $USAGE_REDIS_PASSWORD.

    Raises ValueError with a clear message when the URL is not a Redis URL.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"usage_redis must be a redis://, rediss:// or unix:// URL, not {redacted(url)!r}")
    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "health_check_interval": 30, "decode_responses": True}
    password = os.environ.get(PASSWORD_ENV)
    if password and urlsplit(url).password is None:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)


def ping(url: str, *, timeout: float = 2.0) -> redis.Redis:
    """Connect and check the server answers; raise ConnectionError naming the (redacted) URL otherwise."""
    client = connect(url, timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise ConnectionError(f"cannot reach Redis at {redacted(url)}: {exc}") from None
    return client


# ---------------------------------------------------------------------------
# Publishing (proxy side)


def outbox_cursor(db: schema.sqlite_utils.Database) -> tuple[int, str]:
    """(last published local row id, this database's origin id), creating both on first use."""
    row = db.execute("SELECT last_id, origin FROM redis_outbox WHERE stream = ?", [STREAM]).fetchone()
    if row is not None:
        return int(row[0]), str(row[1])
    origin = f"{socket.gethostname()}-{os.urandom(4).hex()}"
    with db.conn:
        db.execute("INSERT OR IGNORE INTO redis_outbox (stream, last_id, origin) VALUES (?, 0, ?)", [STREAM, origin])
    row = db.execute("SELECT last_id, origin FROM redis_outbox WHERE stream = ?", [STREAM]).fetchone()
    return int(row[0]), str(row[1])


def entry_for(row: dict[str, Any], origin: str) -> dict[str, str]:
    """The stream entry of a local row: its columns as JSON, without the local id.

    Rows written before `uid` existed get one from the database's origin and their id.
    """
    body = {k: v for k, v in row.items() if k != "id" and v is not None}
    body.setdefault("uid", f"{origin}:{row['id']}")
    body.setdefault("origin", origin)
    return {"row": json.dumps(body, separators=(",", ":"))}


def publish_pending(db: schema.sqlite_utils.Database, client: redis.Redis, *, batch: int = PUBLISH_BATCH,
                    maxlen: int = STREAM_MAXLEN) -> int:
    """Publish every row committed since the cursor; return how many were published.

    A Redis that lost its data (restarted without persistence) lost the rows
    no collector had taken yet: the rows of the last REPUBLISH_HOURS are sent
    again (the collector ignores those it has, by uid).
    """
    last_id, origin = outbox_cursor(db)
    marker = f"usage:outbox:{origin}"
    if last_id and not client.exists(marker):
        since = iso_utc(utc_now() - timedelta(hours=REPUBLISH_HOURS))
        (first,) = db.execute("SELECT MIN(id) FROM requests WHERE ts >= ?", [since]).fetchone()
        if first is not None and first <= last_id:
            log.warning("usage: Redis lost the rows it held; publishing the rows of the last %d hours again",
                        REPUBLISH_HOURS)
            last_id = first - 1
    published = 0
    while True:
        cursor = db.execute("SELECT * FROM requests WHERE id > ? ORDER BY id LIMIT ?", [last_id, batch])
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
        if not rows:
            client.set(marker, last_id)
            return published
        pipe = client.pipeline(transaction=False)
        for row in rows:
            pipe.xadd(STREAM, entry_for(row, origin), maxlen=maxlen, approximate=True)
        pipe.set(marker, rows[-1]["id"])
        pipe.execute()
        last_id = rows[-1]["id"]
        with db.conn:
            db.execute("UPDATE redis_outbox SET last_id = ? WHERE stream = ?", [last_id, STREAM])
        published += len(rows)
        if len(rows) < batch:
            return published


class Publisher(Worker):
    """The proxy's publishing thread: local rows to the Redis Stream, once per interval."""

    def __init__(self, db_path: str | Path, url: str, *, interval: float = PUBLISH_INTERVAL,
                 client_factory: Callable[[str], redis.Redis] = connect) -> None:
        # Logged once per change of state, not once per second.
        super().__init__("usage-redis-publisher", interval=interval, final_step=True, failures=FailureLog(
            "publishing rows to Redis", logger=log,
            failing=f"usage: cannot publish rows to Redis {redacted(url)} ({{error}}); they wait in the local database",
            working=f"usage: publishing rows to Redis {redacted(url)} again"))
        self.db_path = Path(db_path)
        self.url = url
        self.published = 0
        self._client_factory = client_factory
        self._client: redis.Redis | None = None
        self._db: schema.sqlite_utils.Database | None = None
        self.start()

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is committed (one last try), then stop."""
        self.stop(timeout)

    def step(self) -> None:
        try:
            if self._db is None:
                if not self.db_path.exists():
                    raise FileNotFoundError(self.db_path)
                self._db = schema.connect(self.db_path)
                schema.migrate(self._db)
            if self._client is None:
                self._client = self._client_factory(self.url)
            self.published += publish_pending(self._db, self._client)
        except (sqlite3.Error, OSError):
            self._close_db()  # opened again at the next step
            raise

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None

    def finish(self) -> None:
        self._close_db()
        if self._client is not None:
            self._client.close()


# ---------------------------------------------------------------------------
# Collecting (central side)


@dataclass
class CollectStats:
    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    malformed: int = 0


def ensure_group(client: redis.Redis) -> None:
    try:
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def rows_of(entries: list[tuple[str, dict[str, str]]], stats: CollectStats) -> list[dict[str, Any]]:
    """Stream entries to rows for `requests` (unknown columns dropped, bad entries counted and skipped)."""
    rows = []
    for _entry_id, fields in entries:
        try:
            row = json.loads(fields.get("row", ""))
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("uid"), str):
            stats.malformed += 1
            continue
        rows.append({k: v for k, v in row.items() if k in schema.REQUEST_COLUMNS and k != "id"})
    return rows


def insert_collected(db: schema.sqlite_utils.Database, rows: list[dict[str, Any]]) -> int:
    """Insert rows in one transaction, ignoring uids already present; return how many were new."""
    if not rows:
        return 0
    before = db.conn.total_changes
    with schema.immediate(db.conn):
        db.table("requests").insert_all(rows, ignore=True, columns=schema.REQUEST_COLUMNS, alter=False)
    return db.conn.total_changes - before


def collect(db_path: str | Path, url: str, *, consumer: str | None = None, once: bool = False,
            batch: int = 500, block_ms: int = 2000, claim_idle_ms: int = 60_000,
            stop: threading.Event | None = None,
            after_insert: Callable[[int], None] | None = None) -> CollectStats:
    """Move rows from the stream into `db_path` until stopped (or, with `once`, until the stream is drained).

    Entries are acknowledged after their rows are committed. At start the
    consumer first re-reads what it had read but not acknowledged (a crash),
    then takes over entries another collector left pending for `claim_idle_ms`.
    """
    # A blocking read waits block_ms: the socket must wait longer than that.
    client = ping(url, timeout=block_ms / 1000 + 5)
    ensure_group(client)
    consumer = consumer or socket.gethostname()
    db = schema.connect(db_path)
    schema.migrate(db)
    stats = CollectStats()
    stop = stop or threading.Event()

    def take(entries: list[tuple[str, dict[str, str]]]) -> None:
        rows = rows_of(entries, stats)
        inserted = insert_collected(db, rows)
        stats.read += len(entries)
        stats.inserted += inserted
        stats.duplicates += len(rows) - inserted
        if entries:
            client.xack(STREAM, GROUP, *[entry_id for entry_id, _ in entries])
        if after_insert is not None:
            after_insert(inserted)

    try:
        while not stop.is_set():  # this consumer's own pending entries: a crash mid-batch
            found = client.xreadgroup(GROUP, consumer, {STREAM: "0"}, count=batch)
            entries = found[0][1] if found else []
            if not entries:
                break
            take(entries)
        start = "0-0"
        while not stop.is_set():  # entries a dead collector left pending
            start, entries, *_ = client.xautoclaim(STREAM, GROUP, consumer, claim_idle_ms, start, count=batch)
            take(entries)
            if start == "0-0":
                break
        while not stop.is_set():
            found = client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=batch,
                                      block=None if once else block_ms)
            entries = found[0][1] if found else []
            if entries:
                take(entries)
            elif once:
                break
    finally:
        db.conn.close()
        client.close()
    return stats


def collect_forever(db_path: str | Path, url: str, *, consumer: str | None = None,
                    stop: threading.Event | None = None, retry: float = 2.0) -> None:
    """`collect` that survives Redis outages: logs once per change and reconnects."""
    stop = stop or threading.Event()
    failing = False

    def back(_inserted: int) -> None:
        nonlocal failing
        if failing:
            log.warning("collect: Redis %s is back", redacted(url))
            failing = False

    while not stop.is_set():
        try:
            collect(db_path, url, consumer=consumer, stop=stop, after_insert=back)
            return
        except (redis.RedisError, ConnectionError) as exc:
            if not failing:
                log.warning("collect: Redis %s unavailable (%s); retrying every %.0f s", redacted(url), exc, retry)
                failing = True
        stop.wait(retry)
