"""The single writer thread of the proxy's rows.

mitmproxy runs every connection on one asyncio loop, so hooks never touch
SQLite: they hand finished rows to `Writer.put`, and one thread (a
QueueWorker, addon/worker.py) writes them in batches with sqlite-utils. If
the database is unavailable, rows wait in the spool (store/spool.py) and are
written when it is back; sanitizing, bounding and inserting rows is store/inserts.py.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sqlite_utils

from addon.store.inserts import insert_rows, sanitize_row
from addon.store.schema import connect, immediate, is_transient, migrate, moved
from addon.store.spool import Spool
from addon.worker import QueueWorker

log = logging.getLogger(__name__)

# Errors that mean a batch was not committed: the database (spool and retry) or its rows (written apart).
WRITE_ERRORS = (sqlite3.Error, OSError, ValueError, TypeError, OverflowError)


class Writer(QueueWorker[dict[str, Any]]):
    """One thread, one connection, batched inserts into `requests`.

    Each batch is one transaction, so readers never see half of one. When the
    database cannot be written (read-only, disk full, locked past the busy
    timeout, directory gone), rows wait in the spool (store/spool.py) and are
    retried every `retry_interval` seconds. Each change of state is logged
    once. A database file that is deleted or moved while open is noticed
    before the next write (schema.moved) and a new file is created at the
    configured path, instead of writing into the lost inode.
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
        super().__init__("usage-writer", max_batch=5000)
        self.path = Path(path)
        self.prepare = prepare
        self.after_commit = after_commit
        self.on_drop = on_drop  # rows that will never be written (their reservations can go)
        self.spool = Spool(self.path, spool_limit)
        self.retry_interval = retry_interval
        # Seconds a batch waits for more rows (bounds what kill -9 can lose):
        # `linger` for a lone row, `busy_linger` while rows keep coming, where
        # every commit saved is CPU (and GIL time) given back to the proxy.
        self.linger_alone = linger
        self.busy_linger = max(busy_linger, linger)
        self._last_batch = (0.0, 0)  # (time.monotonic() of the last commit, rows in it)
        self._db: sqlite_utils.Database | None = None
        self._healthy: bool | None = None
        self._last_attempt = 0.0
        self._outage_dropped = 0
        self._warned_columns: set[str] = set()
        self.written = 0  # rows committed
        self.spooled = 0  # rows that had to wait in memory
        self.dropped = 0  # rows lost because the spool was full
        self.recovered = 0  # spooled rows written later
        self.rejected = 0  # rows SQLite refused for what they contain
        self.reopened = 0  # times the database file vanished and was recreated
        self.start()

    # -- called from the event loop -------------------------------------
    def put(self, row: dict[str, Any]) -> None:
        # Bound memory even when the writer thread is stuck (a lock held
        # past the busy timeout): the queue counts against the spool.
        if self.pending >= self.spool.limit * 2 + 1000:
            self.dropped += 1
            self._outage_dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("usage: writer is %d rows behind; dropped %d rows so far", self.pending, self.dropped)
            self._dropped([row])
            return
        super().put(row)

    def close(self, timeout: float = 10.0) -> None:
        self.stop(timeout)

    @property
    def spool_size(self) -> int:
        return len(self.spool)

    def stats(self) -> dict[str, int]:
        return {
            "written": self.written,
            "spooled": self.spooled,
            "spool": len(self.spool),
            "dropped": self.dropped,
            "recovered": self.recovered,
            "rejected": self.rejected,
            "reopened": self.reopened,
        }

    # -- writer thread ---------------------------------------------------
    def idle_timeout(self) -> float | None:
        return self.retry_interval if self.spool else None  # spooled rows are retried

    def linger(self) -> float:
        # Linger a moment so busy proxies commit rows in groups (one transaction per row costs more than the row).
        when, size = self._last_batch
        busy = size > 1 and time.monotonic() - when < 2 * self.busy_linger
        return self.busy_linger if busy else self.linger_alone

    def handle(self, batch: list[dict[str, Any]]) -> None:
        if batch:
            self._last_batch = (time.monotonic(), len(batch))
        if self.prepare and batch:
            try:
                self.prepare(batch)
            except Exception:  # never lose rows over a pricing bug
                log.exception("usage: preparing rows failed")
        try:
            self._write(batch, force=self.stopping)
        except Exception:  # a bug here must not kill the thread (rows would pile up)
            log.exception("usage: writing rows failed")
            self._spool_rows(batch, None)

    def finish(self) -> None:
        self.spool.save()
        self._drop_connection()

    def _open(self) -> sqlite_utils.Database:
        if self._db is not None and moved(self._db, self.path):
            # Its WAL is still the one at the old path: copy it into the (moved) file, then start a new database.
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
            except BaseException:
                db.conn.close()
                raise
            self._db = db
            self.spooled += self.spool.import_files()
        return self._db

    def _write(self, batch: list[dict[str, Any]], force: bool = False) -> None:
        if self._healthy is False and not force and time.monotonic() - self._last_attempt < self.retry_interval:
            self._spool_rows(batch, None)  # not yet time to retry
            return
        self._last_attempt = time.monotonic()
        try:
            db = self._open()
            if self.spool:  # older rows first, in transactions of bounded size
                while self.spool:
                    part = self.spool.take(5000)
                    try:
                        self._commit(db, part)
                    except BaseException:
                        self.spool.put_back(part)
                        raise
                    self.recovered += len(part)
                self._back()
            if batch:
                self._commit(db, batch)
        except WRITE_ERRORS as exc:
            self._drop_connection()
            if is_transient(exc):
                self._spool_rows(batch, exc)
            else:  # a row SQLite refuses must not hold up the others forever
                self._write_apart(self.spool.take_all() + batch, exc)
            return
        if self._healthy is None:
            self._healthy = True
        self.spool.committed()  # rows saved by an earlier run are committed now

    def _commit(self, db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
        with immediate(db.conn):  # one transaction per batch, the write lock first
            insert_rows(db, rows)
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
            clean = sanitize_row(row, self._warned_columns)
            try:
                self._commit(self._open(), [clean])
            except WRITE_ERRORS as row_exc:
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
                self.spool.limit,
            )
            self._healthy = False
        rows = list(batch)
        evicted = self.spool.add(rows)
        self.spooled += len(rows)
        if evicted:
            self._dropped(evicted)
            for _ in evicted:
                self.dropped += 1
                self._outage_dropped += 1
                if self._outage_dropped == 1 or self._outage_dropped % 1000 == 0:
                    log.error("usage: spool full (%d rows); dropped %d rows so far", self.spool.limit, self.dropped)

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.conn.close()
            except sqlite3.Error:
                pass
            self._db = None
