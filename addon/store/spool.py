"""The spool: rows the writer could not commit yet.

While the database cannot be written, rows wait here in memory, oldest
first and bounded (the oldest go when it is full); a graceful stop with rows
still waiting saves them next to the database (`usage.db.spool-PID.jsonl`,
0600), and the next writer that opens the database claims those files and
puts their rows first in line. A claimed file is removed once its rows are
committed (or saved again at a graceful stop); one whose claimer died in
between is claimed again by the next writer, and each row has its `uid`
before it is on disk, so rows imported twice are inserted once.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from addon.store.inserts import give_uid
from addon.store.schema import open_private

log = logging.getLogger(__name__)


class Spool:
    def __init__(self, db_path: Path, limit: int) -> None:
        self.db_path = db_path
        self.limit = max(int(limit), 1)
        self._rows: deque[dict[str, Any]] = deque()
        self._claimed: list[Path] = []  # spool files of an earlier run, being imported

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows wait at the end of the line; returns the oldest ones pushed out when full."""
        evicted = []
        for row in rows:
            if len(self._rows) >= self.limit:
                evicted.append(self._rows.popleft())
            self._rows.append(row)
        return evicted

    def take(self, most: int) -> list[dict[str, Any]]:
        """Up to `most` of the oldest rows, out of the spool (`put_back` if they cannot be committed)."""
        return [self._rows.popleft() for _ in range(min(most, len(self._rows)))]

    def put_back(self, rows: list[dict[str, Any]]) -> None:
        self._rows.extendleft(reversed(rows))

    def take_all(self) -> list[dict[str, Any]]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    # -- files -------------------------------------------------------------
    def file(self) -> Path:
        return self.db_path.with_name(f"{self.db_path.name}.spool-{os.getpid()}.jsonl")

    def save(self) -> None:
        """Shutdown with the database still unavailable: keep the rows on disk."""
        if not self._rows:
            return
        target = self.file()
        try:
            with open_private(target) as handle:
                for row in self._rows:
                    # The uid now: a file imported again after a crash between commit and removal inserts nothing twice.
                    give_uid(row)
                    # Reservations are not carried over: this process's ones expire on their own.
                    public = {k: v for k, v in row.items() if not k.startswith("_")}
                    handle.write(json.dumps(public, default=str) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            log.error("usage: %d rows could not be written to %s and are lost (%s)", len(self._rows), self.db_path,
                      exc)
            return
        log.warning("usage: %d rows could not be written to %s; saved them in %s", len(self._rows), self.db_path,
                    target)
        self._rows.clear()
        self.committed()  # the claimed files' rows not committed yet are in the saved file now

    def import_files(self) -> int:
        """Rows a previous run saved at shutdown go first in line; returns how many."""
        imported = 0
        prefix = f"{glob.escape(self.db_path.name)}.spool-*.jsonl"
        saved = sorted(self.db_path.parent.glob(prefix))
        # Files claimed by a process that died before committing their rows (kill -9): claimed again.
        orphaned = sorted(p for p in self.db_path.parent.glob(f"{prefix}.importing-*") if _claimer_died(p))
        for path in saved + orphaned:
            claimed = path.with_name(path.name.partition(".importing-")[0] + f".importing-{os.getpid()}")
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
            self.put_back(rows)
            imported += len(rows)
            self._claimed.append(claimed)
            log.warning("usage: importing %d rows saved in %s", len(rows), path)
        return imported

    def committed(self) -> None:
        """The rows of the claimed files are committed: remove the files."""
        for claimed in self._claimed:
            try:
                claimed.unlink(missing_ok=True)
            except OSError as exc:  # the rows are committed: they must not be imported again
                log.warning("usage: could not remove %s (%s); its rows are written, delete it by hand", claimed, exc)
        self._claimed.clear()


def _claimer_died(claimed: Path) -> bool:
    """True when the process named by a claimed file's `.importing-PID` suffix no longer runs."""
    try:
        pid = int(claimed.name.rpartition(".importing-")[2])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # ours (another writer of this process, after a script reload, may hold it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False
