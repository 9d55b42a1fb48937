"""The base of the project's background threads.

Hooks run on mitmproxy's one asyncio loop and never wait on SQLite, Redis or
HTTP: each such job has a named daemon thread of its own (the row writer, the
webhook sender, the body log, the issued-key cache, the limits ticker, the
Redis publisher and settlement thread). They share what is here:

- `Worker`: a thread with start / wake / stop(timeout) / join that runs a
  periodic `step` (every `interval` seconds, or sooner when woken);
- `QueueWorker`: a thread that drains a queue in batches (`handle`) and, on
  stop, handles everything put before it;
- `FailureLog`: a step that keeps failing is logged at WARNING once per change
  of error (not at every tick), its recovery at INFO; the last error is kept
  (`error`) for whoever reports status.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Self

log = logging.getLogger(__name__)


class FailureLog:
    """The state of a step that is retried: logged when it changes, not every time."""

    def __init__(self, what: str, *, logger: logging.Logger = log, failing: str | None = None,
                 working: str | None = None) -> None:
        # `failing` may use {error}. Defaults: "<what> failed: <error>; retrying quietly", "<what> works again".
        self.logger = logger
        self.failing = failing or f"{what} failed: {{error}}; retrying quietly"
        self.working = working or f"{what} works again"
        self.error: BaseException | None = None  # the last failure, None while the step works
        self._said: str | None = None  # the failure logged last

    def failed(self, exc: BaseException) -> None:
        self.error = exc
        said = f"{type(exc).__name__}: {exc}"
        if said != self._said:  # a new failure, or another one than before
            first = self._said is None
            self._said = said
            # A traceback with the first failure only: an unexpected exception is a bug to find.
            # replace(), not format(): the text may hold a path or URL with braces
            self.logger.warning(self.failing.replace("{error}", str(exc)), exc_info=first and not _expected(exc))

    def worked(self) -> None:
        if self._said is not None:
            self.logger.info(self.working)
        self.error = None
        self._said = None

    def run(self, step: Callable[[], object]) -> bool:
        """Run `step`, noting how it went; True when it worked."""
        try:
            step()
        except Exception as exc:
            self.failed(exc)
            return False
        self.worked()
        return True


def _expected(exc: BaseException) -> bool:
    """Failures of the outside world (no traceback needed): I/O, databases, networks."""
    if isinstance(exc, (OSError, sqlite3.Error, TimeoutError)):
        return True
    # redis-py and urllib errors without importing them here
    return any(kind.__module__.split(".")[0] in ("redis", "urllib") for kind in type(exc).__mro__)


class Worker:
    """A named daemon thread running a periodic step.

    `step` (a method to override, or a callable given) runs every `interval`
    seconds, or at once when `wake()` is called; `immediately` runs it once at
    start, `final_step` once more when stopped. Its failures go to `failures`.
    `finish()` runs on the thread after the last step (close connections there).
    """

    def __init__(self, name: str, *, interval: float | None = None, step: Callable[[], object] | None = None,
                 immediately: bool = False, final_step: bool = False, failures: FailureLog | None = None) -> None:
        self.name = name
        self.interval = interval
        self.immediately = immediately
        self.final_step = final_step
        self.failures = failures or FailureLog(f"{name}: periodic work")
        self._step = step
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- any thread ----------------------------------------------------------
    def start(self) -> Self:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to stop and wait up to `timeout` seconds; True when it has."""
        self._stop.set()
        self._wake.set()
        return self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds` on the thread, cut short by stop(); True when stopping."""
        return self._stop.wait(seconds)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """The failure of the last step, None when it worked."""
        return self.failures.error

    # -- the thread ------------------------------------------------------------
    def step(self) -> None:
        if self._step is not None:
            self._step()

    def finish(self) -> None:
        """Runs on the thread when it ends (also after a crash of `run`)."""

    def run(self) -> None:
        if self.immediately and not self.stopping:
            self.failures.run(self.step)
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self.stopping
            if stopping and not self.final_step:
                break
            self.failures.run(self.step)
            if stopping:
                break

    def _main(self) -> None:
        try:
            self.run()
        except Exception:  # a bug in a loop: said loudly, the thread's resources still released
            log.exception("%s: thread stopped by an error", self.name)
        finally:
            try:
                self.finish()
            except Exception:
                log.exception("%s: cleaning up failed", self.name)


_STOP = object()  # put by stop(): everything put before it is handled first


class QueueWorker[T](Worker):
    """A named daemon thread that takes items from a queue and handles them in batches.

    `put()` never blocks (a bounded queue raises queue.Full); `flush(timeout)`
    waits until everything put so far is handled; `stop()` handles what is
    queued and then ends. `handle(batch)` gets up to `max_batch` items, or an
    empty batch when `idle_timeout()` passed with nothing queued (a retry), or
    at stop. `linger()` seconds are waited after the first item of a batch so
    items arriving together are handled together.
    """

    def __init__(self, name: str, *, handle: Callable[[list[T]], object] | None = None, max_batch: int = 1000,
                 maxsize: int = 0, failures: FailureLog | None = None) -> None:
        super().__init__(name, failures=failures or FailureLog(f"{name}: handling queued work"))
        self._handle = handle
        self.max_batch = max_batch
        # SimpleQueue (C, no locks in Python) unless bounded: put() is on the hot path of the writer.
        self._queue: queue.Queue[T | object] | queue.SimpleQueue[T | object] = (
            queue.Queue(maxsize) if maxsize else queue.SimpleQueue())
        self._pending = 0  # put and not handled yet
        self._stop_queued = False  # the end marker is in the queue
        self._idle = threading.Condition()

    def put(self, item: T) -> None:
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._idle:
                self._pending -= 1
            raise

    @property
    def pending(self) -> int:
        return self._pending

    def empty(self) -> bool:
        return self._queue.empty()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every item put so far is handled; False when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        self._stop.set()
        if not self._stop_queued:
            try:  # a bounded queue stays full only while the thread is stuck: wait no longer than `timeout`
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return False  # not stopped; a later stop() tries again
            self._stop_queued = True
        return self.join(max(deadline - time.monotonic(), 0.0))

    def wake(self) -> None:
        """Queue workers wake up for items, or after `idle_timeout()`."""

    # -- the thread ------------------------------------------------------------
    def handle(self, batch: list[T]) -> None:
        if self._handle is not None:
            self._handle(batch)

    def idle_timeout(self) -> float | None:
        """Seconds to wait for an item before handling an empty batch; None: wait for items."""
        return None

    def linger(self) -> float:
        return 0.0

    def run(self) -> None:
        stop = False
        while not stop:
            batch: list[T] = []
            try:
                first = self._queue.get(timeout=self.idle_timeout())
            except queue.Empty:
                pass
            else:
                if first is _STOP:
                    stop = True
                else:
                    batch.append(first)  # type: ignore[arg-type]
                    delay = self.linger()
                    if delay:
                        # A sleep, not a get() with a timeout: items put meanwhile
                        # must not wake this thread (and take the GIL) one by one.
                        time.sleep(delay)
                    while len(batch) < self.max_batch:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is _STOP:
                            stop = True
                            break
                        batch.append(item)  # type: ignore[arg-type]
            try:
                self.failures.run(partial(self.handle, batch))
            finally:
                if batch:
                    with self._idle:
                        self._pending -= len(batch)
                        self._idle.notify_all()
