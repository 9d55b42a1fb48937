"""Review 2: spooled rows survive a crash of the writer that claimed them (addon/store/spool.py).

store/spool.py says "a claimed file is removed once its rows are committed,
so a crash in between imports them again". A claimed file is renamed to
`usage.db.spool-PID.jsonl.importing-PID2`, which the import's glob
(`usage.db.spool-*.jsonl`) never matches again: a writer that claimed the
file and died before committing (kill -9, OOM, a stop timeout) lost its rows
for good, and a graceful stop left the claimed file behind next to the new
spool file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

from addon.store.schema import connect, migrate
from addon.store.spool import Spool
from addon.store.writer import Writer


def _saved_rows(db: Path, pid: int, *paths: str) -> Path:
    """A spool file as a proxy that stopped with the database unavailable leaves it."""
    spool = db.with_name(f"{db.name}.spool-{pid}.jsonl")
    spool.write_text("".join(json.dumps({"ts": "2026-01-01T00:00:00Z", "path": p, "outcome": "ok"}) + "\n"
                             for p in paths))
    os.chmod(spool, 0o600)
    return spool


def _paths(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return sorted(r[0] for r in conn.execute("SELECT path FROM requests"))
    finally:
        conn.close()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_rows_claimed_by_a_writer_killed_before_its_commit_are_imported_by_the_next_one(tmp_path):
    db = tmp_path / "usage.db"
    setup = connect(db)
    migrate(setup)
    setup.conn.close()
    _saved_rows(db, 4242, "/v1/a", "/v1/b")
    # Another process holds the write lock: the writer claims the file, then waits on the lock.
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from addon.store.writer import Writer\n"
         f"w = Writer({str(db)!r}); w.put({{'ts': '2026-01-01T00:00:01Z', 'path': '/v1/c', 'outcome': 'ok'}})\n"
         "time.sleep(120)"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("usage.db.spool-*.importing-*")):
            assert child.poll() is None, "the writer process ended early"
            assert time.monotonic() < deadline, "the writer never claimed the spool file"
            time.sleep(0.05)
        child.kill()  # a crash while the claimed rows wait for the lock
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        holder.rollback()
        holder.close()

    writer = Writer(db)
    writer.put({"ts": "2026-01-01T00:00:02Z", "path": "/v1/d", "outcome": "ok"})
    assert writer.flush(30)
    writer.close()
    assert _paths(db) == ["/v1/a", "/v1/b", "/v1/d"]  # /v1/c was only in the killed process's memory


def test_a_claimed_file_whose_claimer_is_dead_is_imported_once(tmp_path):
    db = tmp_path / "usage.db"
    saved = _saved_rows(db, 4242, "/v1/a")
    orphan = saved.with_name(f"{saved.name}.importing-{_dead_pid()}")
    saved.rename(orphan)
    spool = Spool(db, limit=10)
    assert spool.import_files() == 1
    assert [r["path"] for r in spool.take_all()] == ["/v1/a"]
    assert Spool(db, limit=10).import_files() == 0  # now claimed by this (living) process
    spool.committed()
    assert list(tmp_path.iterdir()) == []


def test_a_file_claimed_by_a_living_process_is_left_to_it(tmp_path):
    db = tmp_path / "usage.db"
    saved = _saved_rows(db, 4242, "/v1/a")
    saved.rename(saved.with_name(f"{saved.name}.importing-{os.getppid()}"))  # our parent: alive
    assert Spool(db, limit=10).import_files() == 0


def test_a_graceful_stop_with_claimed_rows_not_committed_leaves_one_file_whose_rows_keep_their_uid(tmp_path):
    db = tmp_path / "usage.db"
    _saved_rows(db, 4242, "/v1/a", "/v1/b")
    first = Spool(db, limit=10)
    assert first.import_files() == 2
    first.add([{"path": "/v1/c"}])
    first.save()  # the database is still unavailable
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"usage.db.spool-{os.getpid()}.jsonl"], files  # the claimed file's rows are in it
    rows = [json.loads(line) for line in (tmp_path / files[0]).read_text().splitlines()]
    assert [r["path"] for r in rows] == ["/v1/a", "/v1/b", "/v1/c"]
    # Each row has its uid before it is on disk: imported twice (a crash between commit and removal), written once.
    assert all(r.get("uid") for r in rows) and len({r["uid"] for r in rows}) == 3
