"""The single writer thread of the proxy's rows.

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

from addon.store.schema import (
    REQUEST_COLUMNS,
    connect,
    file_id,
    insert_rows,
    is_transient,
    migrate,
    open_private,
)

log = logging.getLogger(__name__)


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
