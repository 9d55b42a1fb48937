"""The base of the background threads (addon/worker.py), on real threads."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time

import pytest

from addon.worker import FailureLog, QueueWorker, Worker


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_periodic_step_runs_on_a_named_thread_until_stopped():
    names: list[str] = []
    worker = Worker("test-ticker", interval=0.02, step=lambda: names.append(threading.current_thread().name))
    worker.start()
    assert wait_for(lambda: len(names) >= 3)
    assert worker.alive and set(names) == {"test-ticker"}
    assert threading.current_thread().daemon is False and worker._thread.daemon
    assert worker.stop(timeout=10) is True
    assert not worker.alive
    count = len(names)
    time.sleep(0.1)
    assert len(names) == count  # no step after stop


def test_wake_runs_the_step_before_its_interval():
    ran = threading.Event()
    worker = Worker("test-wake", interval=3600, step=ran.set).start()
    try:
        assert not ran.wait(0.1)
        worker.wake()
        assert ran.wait(10)
    finally:
        assert worker.stop(10)


def test_immediately_and_final_step():
    calls: list[str] = []

    class Counting(Worker):
        def step(self) -> None:
            calls.append("step")

        def finish(self) -> None:
            calls.append("finish")

    worker = Counting("test-final", interval=3600, immediately=True, final_step=True).start()
    assert wait_for(lambda: calls == ["step"])
    assert worker.stop(10)
    assert calls == ["step", "step", "finish"]  # at start, at stop, then cleaned up


def test_stop_cuts_a_sleep_short():
    woke: list[bool] = []

    def step() -> None:
        woke.append(worker.sleep(3600))

    worker = Worker("test-sleep", interval=0, step=step).start()
    time.sleep(0.05)
    started = time.monotonic()
    assert worker.stop(10)
    assert time.monotonic() - started < 5 and woke[-1] is True


def test_failures_warn_once_per_change_of_error_and_recovery_at_info(caplog):
    outcome: list[BaseException | None] = [sqlite3.OperationalError("database is locked")]

    def step() -> None:
        if outcome[0] is not None:
            raise outcome[0]

    logger = logging.getLogger("test.worker")
    worker = Worker("test-fail", interval=0.01, step=step, failures=FailureLog("test step", logger=logger))
    with caplog.at_level(logging.DEBUG, logger="test.worker"):
        worker.start()
        try:
            assert wait_for(lambda: len(caplog.records) >= 1)
            time.sleep(0.1)  # many ticks fail the same way
            assert isinstance(worker.error, sqlite3.OperationalError)
            outcome[0] = OSError("disk I/O error")  # another error: said again
            assert wait_for(lambda: isinstance(worker.error, OSError))
            time.sleep(0.1)
            outcome[0] = None
            assert wait_for(lambda: worker.error is None)
            time.sleep(0.1)
        finally:
            assert worker.stop(10)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "test.worker"]
    assert said == [
        (logging.WARNING, "test step failed: database is locked; retrying quietly"),
        (logging.WARNING, "test step failed: disk I/O error; retrying quietly"),
        (logging.INFO, "test step works again"),
    ]
    assert not any(r.exc_info for r in caplog.records)  # expected failures: no traceback


def test_an_unexpected_failure_gets_one_traceback(caplog):
    failures = FailureLog("bug", logger=logging.getLogger("test.worker"), failing="broken {x}: {error}")
    with caplog.at_level(logging.WARNING, logger="test.worker"):
        for _ in range(3):
            assert failures.run(lambda: 1 / 0) is False
    [record] = caplog.records
    assert record.getMessage() == "broken {x}: division by zero" and record.exc_info


def test_queue_worker_handles_in_batches_and_everything_before_stop():
    handled: list[list[int]] = []
    gate = threading.Event()

    def handle(batch: list[int]) -> None:
        gate.wait(10)
        handled.append(batch)

    worker: QueueWorker[int] = QueueWorker("test-queue", handle=handle, max_batch=50)
    worker.start()
    for i in range(120):
        worker.put(i)
    assert worker.pending == 120
    assert worker.flush(timeout=0.1) is False  # the handler is held
    gate.set()
    assert worker.flush(timeout=10)
    for i in range(120, 130):
        worker.put(i)
    assert worker.stop(10)  # what was put before stop is handled
    items = [i for batch in handled for i in batch]
    assert items == list(range(130))
    assert max(len(batch) for batch in handled) <= 50 and worker.pending == 0


def test_bounded_queue_refuses_without_blocking():
    gate = threading.Event()
    worker: QueueWorker[int] = QueueWorker("test-bounded", handle=lambda batch: gate.wait(10), maxsize=2)
    worker.start()
    worker.put(0)
    assert wait_for(worker.empty)  # the thread holds item 0
    worker.put(1)
    worker.put(2)
    started = time.monotonic()
    with pytest.raises(queue.Full):
        worker.put(3)
    assert time.monotonic() - started < 1 and worker.pending == 3
    gate.set()
    assert worker.stop(10) and worker.pending == 0


def test_idle_timeout_hands_an_empty_batch_and_failures_keep_the_thread(caplog):
    seen: list[list[int]] = []

    class Retrying(QueueWorker[int]):
        def idle_timeout(self) -> float | None:
            return 0.02 if seen.count([]) < 2 else None  # then only items wake it

        def handle(self, batch: list[int]) -> None:
            seen.append(batch)
            if batch == [1]:
                raise ValueError("bad item")

    worker = Retrying("test-idle")
    with caplog.at_level(logging.WARNING, logger="addon.worker"):
        worker.start()
        assert wait_for(lambda: seen.count([]) >= 2)  # woken with nothing queued
        worker.put(1)
        assert worker.flush(10) and isinstance(worker.error, ValueError)
        worker.put(2)  # the thread goes on after a failed batch
        assert worker.flush(10) and [2] in seen and worker.alive
        assert worker.stop(10)
    assert any("bad item" in r.getMessage() for r in caplog.records)


def test_finish_runs_after_a_crash_of_the_loop(caplog):
    finished = threading.Event()

    class Crashing(Worker):
        def run(self) -> None:
            raise RuntimeError("bug in the loop")

        def finish(self) -> None:
            finished.set()

    with caplog.at_level(logging.ERROR, logger="addon.worker"):
        worker = Crashing("test-crash").start()
        assert finished.wait(10) and worker.join(10)
    assert "test-crash: thread stopped by an error" in caplog.text
