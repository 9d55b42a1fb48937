"""Review 2: QueueWorker.stop(timeout) on a bounded queue whose thread is stuck (addon/worker.py).

stop() put its end marker with a blocking put(): with the queue full and the
thread stuck in `handle` (the body log writing to a pipe nobody reads, a hung
network file system), stop(timeout) never returned, and the proxy's done()
(BodyLog.done -> BodyLogWriter.close) hung forever instead of for `timeout`.
"""

from __future__ import annotations

import threading
import time

from addon.worker import QueueWorker


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_stop_of_a_full_bounded_queue_with_a_stuck_thread_returns_after_its_timeout():
    gate = threading.Event()
    handled: list[int] = []

    def handle(batch: list[int]) -> None:
        gate.wait(60)  # stuck
        handled.extend(batch)

    worker: QueueWorker[int] = QueueWorker("test-stuck", handle=handle, maxsize=2)
    worker.start()
    worker.put(0)
    assert wait_for(worker.empty)  # the thread holds item 0 and is stuck
    worker.put(1)
    worker.put(2)  # full
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(worker.stop(0.5)), daemon=True)
    started = time.monotonic()
    stopper.start()
    stopper.join(10)
    try:
        assert not stopper.is_alive(), "stop(0.5) was still blocked after 10 s"
        assert result == [False] and time.monotonic() - started < 10  # not stopped: the thread is stuck
    finally:
        gate.set()
    # Unstuck later, the thread still handles what was queued and ends.
    assert worker.stop(10) and handled == [0, 1, 2]
