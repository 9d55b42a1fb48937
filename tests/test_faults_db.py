"""Database faults: proxying continues, rows wait in the spool, nothing is lost.

Faults are real: an immutable database file (chattr +i: root ignores file
modes), a deleted or moved file, a full tmpfs, another process holding the
write lock, a missing directory. Each case checks that every client call
succeeded, that every row arrives once the database is back, and that each
state change is logged once.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import FAKE_KEY, ROOT, free_port, wait_port

sys.path.insert(0, str(ROOT))

from addon.store.schema import connect, migrate  # noqa: E402
from addon.store.writer import Writer  # noqa: E402

# Limits fail closed by default when usage cannot be read; these tests are
# about the recording side, so they admit (see test_fail_policy for both).
OPEN = {"usage_fail": "open"}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def call(proxy, marker: str, n: int = 1, stream: bool = False) -> None:
    """n chat completions through the (reverse) proxy; each must succeed."""
    # A new connection per call: tests/route.py's rerouting stalls the Nth
    # request on a kept-alive connection (seen with plain mitmdump, no addon).
    for _ in range(n):
        r = httpx.post(f"{proxy.url}/v1/chat/completions", json={**BODY, "stream": stream}, timeout=20,
                       headers={"authorization": f"Bearer {FAKE_KEY}", "user-agent": marker})
        assert r.status_code == 200, r.text


def count(db: Path, marker: str | None = None) -> int:
    conn = sqlite3.connect(db)
    try:
        if not conn.execute("select 1 from sqlite_master where name = 'requests'").fetchone():
            return 0  # the proxy has not created its schema yet
        if marker is None:
            return conn.execute("select count(*) from requests").fetchone()[0]
        return conn.execute("select count(*) from requests where user_agent = ?", (marker,)).fetchone()[0]
    finally:
        conn.close()


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def chattr(flag: str, *paths: Path) -> bool:
    result = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True)
    return result.returncode == 0


def test_read_only_database(make_proxy, tmp_path):
    """The file becomes unwritable under a running proxy (even for root): spooled, then written."""
    proxy = make_proxy(mode="reverse", options=OPEN)
    call(proxy, "before", 2)
    assert wait_for(lambda: count(proxy.db) == 2)
    files = [proxy.db, Path(f"{proxy.db}-wal")]  # not -shm: it is mmapped, SIGBUS for every reader
    if not chattr("+i", *files):
        pytest.skip("chattr +i is not supported here")
    try:
        call(proxy, "during", 5)
        assert wait_for(lambda: "cannot write to" in proxy.log())
        assert count(proxy.db, "during") == 0
    finally:
        chattr("-i", *files)
    assert wait_for(lambda: count(proxy.db, "during") == 5)
    call(proxy, "after", 1)
    assert wait_for(lambda: count(proxy.db) == 8)
    log = proxy.log()
    assert log.count("cannot write to") == 1 and log.count("is writable again") == 1, log
    assert "Traceback" not in log


def test_deleted_database_is_recreated(make_proxy):
    proxy = make_proxy(mode="reverse", options=OPEN)
    call(proxy, "before", 2)
    assert wait_for(lambda: count(proxy.db) == 2)
    proxy.db.unlink()
    call(proxy, "after", 3)
    assert wait_for(lambda: proxy.db.exists() and count(proxy.db) == 3)
    assert count(proxy.db, "after") == 3
    assert "was deleted or moved" in proxy.log()


def test_moved_database(make_proxy, tmp_path):
    """Rows before the move stay in the moved file (complete), later ones go to a new file."""
    proxy = make_proxy(mode="reverse", options=OPEN)
    call(proxy, "before", 4)
    assert wait_for(lambda: count(proxy.db) == 4)
    moved = tmp_path / "archive.db"
    os.rename(proxy.db, moved)
    call(proxy, "after", 3)
    assert wait_for(lambda: proxy.db.exists() and count(proxy.db) == 3)
    conn = sqlite3.connect(moved)
    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert conn.execute("select count(*) from requests").fetchone()[0] == 4
    conn.close()


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MB tmpfs; skipped where mounting is not allowed."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    """Fill a filesystem to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (65536, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                pass
    return filler


def test_disk_full(make_proxy, tiny_fs):
    db = tiny_fs / "usage.db"
    proxy = make_proxy(mode="reverse", db=db, options=OPEN)
    call(proxy, "before", 2)
    assert wait_for(lambda: count(db) == 2)
    filler = fill(tiny_fs)
    try:
        call(proxy, "full", 20)  # the proxy keeps answering
        assert wait_for(lambda: "cannot write to" in proxy.log())
    finally:
        filler.unlink()
    assert wait_for(lambda: count(db, "full") == 20)
    proxy.stop()
    conn = sqlite3.connect(db)
    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert proxy.log().count("cannot write to") == 1


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


TRACK_ONLY = """
timezone = "UTC"
default_pool = "all"

[pools.all]
window = "day"
models = ["*"]
"""


def test_write_lock_held_by_another_process(make_proxy, tmp_path):
    """Another process holds the write lock past the busy timeout (5 s): nothing waits on it but the writer.

    Track-only pools: no admission check (which would wait for the lock too, see test_fail_policy).
    """
    config = tmp_path / "track.toml"
    config.write_text(TRACK_ONLY)
    proxy = make_proxy(mode="reverse", options={"usage_config": str(config)})
    call(proxy, "before", 1)
    assert wait_for(lambda: count(proxy.db) == 1)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(proxy.db), "7"], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: call(proxy, "locked", 5), range(4)))
    assert locker.poll() is None, "the lock was released before all calls were answered"
    assert count(proxy.db, "locked") == 0
    locker.wait(20)
    assert wait_for(lambda: count(proxy.db, "locked") == 20)
    log = proxy.log()
    assert log.count("cannot write to") == 1 and "database is locked" in log


def test_graceful_stop_saves_spool_and_next_start_imports_it(make_proxy, tmp_path):
    proxy = make_proxy(mode="reverse", options=OPEN)
    call(proxy, "before", 1)
    assert wait_for(lambda: count(proxy.db) == 1)
    files = [proxy.db, Path(f"{proxy.db}-wal")]
    if not chattr("+i", *files):
        pytest.skip("chattr +i is not supported here")
    try:
        call(proxy, "spooled", 6)
        assert wait_for(lambda: "cannot write to" in proxy.log())
        assert proxy.stop(signal.SIGINT) == 0
    finally:
        chattr("-i", *files)
    saved = list(tmp_path.glob("usage.db.spool-*.jsonl"))
    assert len(saved) == 1 and len(saved[0].read_text().splitlines()) == 6
    assert FAKE_KEY.encode() not in saved[0].read_bytes()
    again = make_proxy(mode="reverse", options=OPEN)
    call(again, "after", 1)
    assert wait_for(lambda: count(proxy.db, "spooled") == 6 and count(proxy.db, "after") == 1)
    assert not list(tmp_path.glob("usage.db.spool-*"))  # imported, then removed


# -- the Writer on its own (real files, no proxy) ----------------------------


def row(i: int) -> dict:
    return {"ts": f"2026-01-01T00:00:{i % 60:02d}.000Z", "path": "/v1/x", "outcome": "ok", "input_tokens": i}


def test_spool_is_bounded_and_counts(tmp_path):
    """Directory gone: rows wait up to the limit, the oldest are dropped and counted, the rest recovered."""
    directory = tmp_path / "data"
    directory.mkdir()
    writer = Writer(directory / "usage.db", spool_limit=10, retry_interval=0.1)
    try:
        writer.put(row(0))
        assert writer.flush()
        shutil.rmtree(directory)
        for i in range(1, 26):
            writer.put(row(i))
        assert writer.flush()
        assert wait_for(lambda: writer.spool_size == 10)
        assert writer.dropped == 15
        directory.mkdir()
        assert wait_for(lambda: writer.spool_size == 0)
        assert writer.recovered == 10
        conn = sqlite3.connect(directory / "usage.db")
        kept = [r[0] for r in conn.execute("select input_tokens from requests order by id")]
        conn.close()
        assert kept == list(range(16, 26))  # the newest rows survive
    finally:
        writer.close()


def test_rows_sqlite_refuses_do_not_block_the_others(tmp_path):
    """Unknown columns, values SQLite cannot bind: the row is cleaned, later rows are not held up."""
    writer = Writer(tmp_path / "usage.db")
    try:
        writer.put(row(1))
        writer.put({**row(2), "not_a_column": 1, "error": {"nested": True}, "status": 10**30})
        writer.put({**row(3), "error": "bad \udcff surrogate"})
        writer.put(row(4))
        assert writer.flush()
        assert wait_for(lambda: count(tmp_path / "usage.db") == 4)
        assert writer.spool_size == 0 and writer.rejected == 0
    finally:
        writer.close()


def test_batches_are_atomic_for_readers(tmp_path):
    """A batch is one transaction: a reader (a real datasette process, and sqlite) never sees part of one."""
    db = tmp_path / "usage.db"
    setup = connect(db)
    migrate(setup)
    setup.conn.close()
    sizes: list[int] = []

    def tag(batch: list[dict]) -> None:  # runs on the writer thread, once per batch
        sizes.append(len(batch))
        for item in batch:
            item["request_id"] = f"batch-{len(sizes)}-{len(batch)}"

    port = free_port()
    datasette = subprocess.Popen([str(Path(sys.executable).parent / "datasette"), "serve", str(db),
                                  "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writer = Writer(db, prepare=tag)
    partial: list[str] = []
    errors: list[str] = []
    stop = threading.Event()
    query = "select request_id, count(*) from requests group by request_id"

    def check(groups) -> None:
        for request_id, n in groups:
            if int(request_id.rsplit("-", 1)[1]) != n:
                partial.append(f"{request_id}: {n}")

    def read_sqlite() -> None:
        conn = sqlite3.connect(db, timeout=5)
        while not stop.is_set():
            try:
                check(conn.execute(query).fetchall())
            except sqlite3.Error as exc:
                errors.append(repr(exc))
        conn.close()

    def read_datasette() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                r = client.get(f"http://127.0.0.1:{port}/usage.json", params={"sql": query, "_shape": "array"})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    check([(g["request_id"], g["count(*)"]) for g in r.json()])
    try:
        wait_port(port, proc=datasette)
        readers = [threading.Thread(target=read_sqlite), threading.Thread(target=read_datasette)]
        for thread in readers:
            thread.start()
        for burst in range(40):
            for i in range(50 + burst * 37):  # bursts bigger than sqlite-utils' insert chunk
                writer.put(row(i))
            writer.flush()
        stop.set()
        for thread in readers:
            thread.join()
    finally:
        stop.set()
        writer.close()
        datasette.terminate()
        datasette.wait()
    assert max(sizes) > 500
    assert not errors, errors[:3]
    assert not partial, partial[:3]
    assert count(db) == sum(sizes)
