"""The mitmproxy addon that stops requests a spent pool cannot afford.

Runs after UsageMeter (which has classified the request). It drives a ledger
(ledger/backend.py: the SQLite one, or the Redis one with `usage_redis`). Most
requests are admitted in memory from this process's lease (ledger/leases.py);
the others are decided on the ledger thread, and the event loop only awaits the answer. A refused
request never reaches OpenAI: it gets an OpenAI-shaped 429 that the official
SDKs do not retry (`usage_block=reject`) or its connection is killed
(`usage_block=kill`), and it is recorded with outcome `blocked`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mitmproxy import command, ctx, exceptions, http

from addon.ledger.alerts import AlertEvaluator, WebhookSender
from addon.ledger.backend import LedgerBackend
from addon.ledger.estimate import PreviousUsage, estimate, is_continuation
from addon.ledger.policy import Check, Decision, checks_for, never_fits, refusal_message, seconds_until
from addon.ledger.redis_ledger import RedisLedger
from addon.ledger.reservations import HEARTBEAT_INTERVAL
from addon.ledger.sqlite_ledger import Ledger
from addon.metering.wire import RequestFacts
from addon.proxy.meter import Call, UsageMeter
from addon.store.inserts import Reservation
from addon.windows import utc_now
from addon.worker import FailureLog, Worker

log = logging.getLogger(__name__)

ADMISSION_TIMEOUT = 3.0  # seconds before the fail policy decides
TICK_INTERVAL = 1.0  # alerts evaluation and reset pick-up
RECENT_RESPONSES = 4096  # usage of the latest responses, for continuations before their rows land

# An admission's waiter and what the ledger thread answered: a decision, or why it could not.
Answer = tuple["asyncio.Future[Decision]", Decision | None, BaseException | None]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call is not admitted: HTTP status (429 spent, 503 fail closed), the decision, the message."""

    status: int
    decision: Decision | None
    message: str


def refusal_error(status: int, message: str) -> dict[str, Any]:
    """The OpenAI-shaped `error` object of a refusal (HTTP body and WebSocket `error` event)."""
    return {
        "message": message,
        "type": "insufficient_quota" if status == 429 else "server_error",
        "param": None,
        "code": "usage_limit_exceeded" if status == 429 else "usage_unavailable",
    }


class Limits:
    def __init__(self, meter: UsageMeter) -> None:
        self.meter = meter
        meter.listeners.append(self)
        self.ledger: LedgerBackend | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.alerts: AlertEvaluator | None = None
        self.sender: WebhookSender | None = None
        self._ticker: Worker | None = None
        self._key: tuple | None = None
        self._ticks = 0
        self._periodic_failures: dict[str, FailureLog] = {}  # per periodic step: warned once per change of error
        self._failing = False
        # Admissions waiting for the ledger: (checks, estimate, waiter); the
        # estimate is a function of the ledger when it needs a look-up.
        self._pending: list[tuple[list[Check], int | Callable[[LedgerBackend], int], asyncio.Future[Decision]]] = []
        # response id (and "conversation:" + id) -> usage, as settled here: a
        # continuation's previous response is usually the one just finished.
        self.recent: OrderedDict[str, PreviousUsage] = OrderedDict()
        self._pending_lock = threading.Lock()
        self._drain_scheduled = False

    # -- options -----------------------------------------------------------
    def load(self, loader) -> None:
        loader.add_option(
            "usage_block", str, "reject",
            "How a request for a spent pool is stopped: reject (OpenAI-shaped 429, not retried by SDKs) or kill.",
            choices=("reject", "kill"),
        )
        loader.add_option(
            "usage_fail", str, "",
            "When usage cannot be known (database unavailable): open admits, closed refuses; "
            "empty follows each pool's `fail` setting (closed for limited pools, open for track-only ones).",
            choices=("", "open", "closed"),
        )
        loader.add_option("usage_alert_webhook", str, "",
                          "URL that receives alerts as JSON POSTs (overrides [alerts] webhook in the config).")

    def configure(self, updated: set[str]) -> None:
        config = self.meter.config
        if config is None:
            return
        redis_url = ctx.options.usage_redis.strip() if "usage_redis" in ctx.options else ""
        key = (id(config), ctx.options.usage_db, ctx.options.usage_alert_webhook, redis_url)
        if key == self._key:
            return
        self._key = key
        self._shutdown()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-ledger")
        with self._pending_lock:
            self._pending, self._drain_scheduled = [], False
        webhook = ctx.options.usage_alert_webhook or config.webhook
        self.sender = WebhookSender(webhook, ctx.options.usage_db, resend_undelivered=True) if webhook else None
        if redis_url:  # pools shared with the proxies of other hosts (addon/ledger/redis_ledger.py)
            try:
                shared = RedisLedger(redis_url, ctx.options.usage_db, config)
            except ValueError as exc:
                raise exceptions.OptionsError(f"usage_redis: {exc}") from None
            self.ledger = shared
            self.alerts = AlertEvaluator(self.sender, claim=shared.claim_alert)
        else:
            self.ledger = Ledger(ctx.options.usage_db, config)
            self.alerts = AlertEvaluator(self.sender)
        self.executor.submit(self._publish)
        self._ticker = Worker("usage-ticker", interval=TICK_INTERVAL, step=self._submit_tick).start()

    def done(self) -> None:
        # Shutting down, the meter's done() ran first and wrote every row:
        # nothing is in flight. A script reload keeps the flows in flight:
        # their reservations stay (the new instance's rows take them off).
        self._shutdown(final=not self.meter.reloading)

    def _shutdown(self, final: bool = False) -> None:
        if self._ticker is not None:
            self._ticker.stop(5)
            self._ticker = None
        if self.executor is not None:
            ledger = self.ledger
            if ledger is not None:
                self.executor.submit(self._give_up_leases, ledger, final)
                self.executor.submit(ledger.close)
            self.executor.shutdown(wait=True)
        if self.sender is not None:
            self.sender.close()
        self.executor = self.ledger = self.sender = None

    # -- ledger thread -----------------------------------------------------
    @staticmethod
    def _give_up_leases(ledger: LedgerBackend, final: bool) -> None:
        try:
            if final:
                ledger.release_all()
            else:  # reconfigured: requests in flight still hold their part
                ledger.release_idle(idle=0)
        except Exception as exc:
            log.warning("usage: could not give back reserved tokens (they expire in 2 minutes): %s", exc)

    def _publish(self) -> None:
        assert self.ledger is not None
        try:
            self.ledger.publish_pools()
        except Exception as exc:
            log.warning("usage: could not publish pools to the database: %s", exc)

    def _submit_tick(self) -> None:
        """Ticker thread: the periodic work runs on the ledger thread, after the admissions queued before it."""
        executor = self.executor
        if executor is None:
            return
        try:
            executor.submit(self._tick)
        except RuntimeError:
            pass  # shutting down

    def _tick(self) -> None:
        ledger, alerts = self.ledger, self.alerts
        if ledger is None or alerts is None:
            return
        self._ticks += 1
        # Each step on its own: one failing must not skip the others.
        steps = [ledger.give_up_crossed, ledger.release_idle, self._evaluate_alerts]
        if self._ticks % int(HEARTBEAT_INTERVAL / TICK_INTERVAL) == 1:
            steps.insert(0, ledger.heartbeat)
        for step in steps:
            self._periodic(step.__name__, step)

    def _periodic(self, name: str, step: Callable[[], object]) -> None:
        """Run a periodic step (ledger thread); its failures are warned once per change of error."""
        failures = self._periodic_failures.get(name)
        if failures is None:
            failures = self._periodic_failures[name] = FailureLog(f"usage: periodic ledger work ({name})", logger=log)
        failures.run(step)

    def _evaluate_alerts(self) -> None:
        ledger, alerts = self.ledger, self.alerts
        assert ledger is not None and alerts is not None
        config = ledger.config
        thresholds = {name: pool.thresholds for name, pool in config.pools.items()}
        # Autocommit: the write lock is taken only when an alert actually fires.
        forecast = config.forecast_alerts
        alerts.evaluate(ledger.db, ledger.status(forecast=forecast), thresholds, ledger.clock(), forecast=forecast)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Decide every admission waiting now, in one transaction (ledger thread)."""
        assert self.ledger is not None and self.alerts is not None
        with self._pending_lock:
            batch, self._pending = self._pending, []
            self._drain_scheduled = False
        if not batch:
            return
        try:
            ledger = self.ledger
            decisions = ledger.admit_many([(checks, estimate if isinstance(estimate, int) else estimate(ledger))
                                           for checks, estimate, _ in batch])
        except BaseException as exc:
            failed: list[Answer] = [(waiter, None, exc) for _, _, waiter in batch]
            loop.call_soon_threadsafe(self._resolve, failed)
            return
        decided: list[Answer] = [(w, d, None) for (_, _, w), d in zip(batch, decisions, strict=True)]
        loop.call_soon_threadsafe(self._resolve, decided)
        fresh = [d for d in decisions if not d.admitted and d.check is not None and self.alerts.note_exhausted(
            d.check.pool.name, d.check.key_id, d.window_start)]
        if fresh:  # the first refusal of a window: the pool is at 100%
            self._periodic("_evaluate_alerts", self._evaluate_alerts)

    def _resolve(self, answers: list[Answer]) -> None:
        """Hand decisions to the waiting requests (event loop)."""
        for waiter, decision, exc in answers:
            if waiter.done():  # gave up waiting (timeout): give a late admission back
                if decision is not None and decision.admitted and decision.owner is not None and self.ledger:
                    self.ledger.give_back(decision.reservation, decision.estimate, decision.owner)
            elif decision is None:
                waiter.set_exception(exc or RuntimeError("usage ledger gave no decision"))
            else:
                waiter.set_result(decision)

    # -- hooks -------------------------------------------------------------
    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        call = self.meter.calls.get(flow.id)
        if call is None or flow.response is not None:
            return None
        upgrade = call.transport == "websocket"
        if upgrade and not call.request.model:
            return None  # Responses WebSocket mode: each response.create is admitted on its own
        if not upgrade and call.method != "POST":  # reading (a batch, a response) spends nothing
            return None
        pending = self.admit(call, b"" if upgrade else flow.request.raw_content, upgrade=upgrade)
        if pending is None:
            return None
        return self._admit_request(flow, call, pending)

    async def _admit_request(self, flow: http.HTTPFlow, call: Call,
                             pending: Coroutine[Any, Any, Refusal | None]) -> None:
        refusal = await pending
        if refusal is not None:
            self._block(flow, call, refusal.status, refusal.decision, refusal.message)

    def admit(self, call: Call, body: bytes | None, *,
              upgrade: bool = False) -> Coroutine[Any, Any, Refusal | None] | None:
        """Admission of one metered call (an HTTP request or a WebSocket `response.create`).

        None: admitted now, from this process's lease (or nothing limits it).
        Otherwise a coroutine that the caller awaits: None when admitted, else
        the Refusal to show the client. An admitted call holds its reservation
        in `call.extra["reservation"]`, settled by its row. `upgrade`: a
        WebSocket upgrade, admitted only while the pool has tokens left; it
        reserves nothing.
        """
        config = self.meter.config
        ledger = self.ledger
        if config is None or self.executor is None or ledger is None:
            return None
        checks = checks_for(config, call.pool, call.key_id, call.label)
        if not checks:
            return None
        outcome = self.decide(checks, call.request, call.endpoint.name, body, upgrade=upgrade)
        if isinstance(outcome, Decision):
            # Most requests: admitted from this process's lease, no waiting.
            # This path returns no coroutine, so it costs none.
            if outcome.admitted:
                self._admitted(call, outcome, upgrade)
                return None
            return self._refused_now(outcome)
        return self._admit(call, checks, outcome, upgrade)

    def decide(self, checks: list[Check], facts: RequestFacts, endpoint: str,
               body: bytes | None, *, upgrade: bool = False) -> Decision | asyncio.Future[Decision]:
        """Admit or refuse one request on the event loop.

        A Decision when it is decided at once: admitted from this process's
        lease, or refused as larger than a whole limit. Otherwise a future of
        the ledger thread's decision (which also looks up the previous
        response of a continuation this process did not see); it raises
        when the database cannot answer.
        """
        config, ledger = self.meter.config, self.ledger
        assert config is not None and ledger is not None
        if upgrade:
            needed = 1  # the socket itself spends nothing: only a spent pool refuses it
        else:
            previous = None
            if is_continuation(facts):
                previous = self.previous_known(facts.previous_response_id, facts.conversation)
                if previous is None:
                    # Recorded by another process, or earlier: the database knows (ledger thread).
                    def with_previous(ledger: LedgerBackend) -> int:
                        found = ledger.previous_usage(facts.previous_response_id, facts.conversation)
                        return estimate(facts, endpoint, config, found, body)

                    return self._queue(checks, with_previous)
            needed = estimate(facts, endpoint, config, previous, body)
            too_big = never_fits(checks, needed)
            if too_big is not None:
                return Decision(False, None, too_big, estimate=needed, reason="never")
        decision = ledger.admit_local(checks, needed)
        if decision is not None:
            return decision
        return self._queue(checks, needed)

    def previous_known(self, response_id: str | None, conversation: str | None) -> PreviousUsage | None:
        """Usage of a continuation's previous response settled by this process (event loop, no I/O)."""
        if response_id:
            return self.recent.get(response_id)
        if conversation:
            return self.recent.get("conversation:" + conversation)
        return None

    def _queue(self, checks: list[Check], needed: int | Callable[[LedgerBackend], int]) -> asyncio.Future[Decision]:
        # Requests arriving together are decided together: one ledger
        # transaction and one wake-up of each thread for the whole group.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Decision] = loop.create_future()
        executor = self.executor
        with self._pending_lock:
            self._pending.append((checks, needed, waiter))
            schedule, self._drain_scheduled = not self._drain_scheduled, True
        if schedule:
            try:
                assert executor is not None
                executor.submit(self._drain, loop)
            except (RuntimeError, AssertionError) as exc:  # shutting down
                with self._pending_lock:
                    self._pending, self._drain_scheduled = [], False
                waiter.set_exception(RuntimeError(f"usage ledger is not running ({exc})"))
        return waiter

    def _admitted(self, call: Call, decision: Decision, upgrade: bool) -> None:
        if upgrade or call.finished:
            # An upgrade uses nothing; a client that left while we waited is recorded against nothing.
            if self.ledger is not None and decision.owner is not None:
                self.ledger.give_back(decision.reservation, decision.estimate, decision.owner)
            return
        call.extra["reservation"] = Reservation(decision.reservation, decision.estimate, decision.owner)

    async def _admit(self, call: Call, checks: list[Check], waiter: asyncio.Future[Decision],
                     upgrade: bool) -> Refusal | None:
        try:
            decision = await asyncio.wait_for(waiter, ADMISSION_TIMEOUT)
        except Exception as exc:  # database down, locked past the timeout, ...
            return self._fail(checks, exc)
        if self._failing:
            self._failing = False
            log.warning("usage: limits can be checked again")
        if decision.admitted:
            self._admitted(call, decision, upgrade)
            return None
        return self._refusal(decision)

    async def _refused_now(self, decision: Decision) -> Refusal:
        return self._refusal(decision)

    def _refusal(self, decision: Decision) -> Refusal:
        return Refusal(429, decision, refusal_message(decision, self.ledger.clock() if self.ledger else utc_now()))

    def _fail(self, checks, exc: BaseException) -> Refusal | None:
        policy = ctx.options.usage_fail or ("closed" if any(c.pool.fail == "closed" for c in checks) else "open")
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not self._failing:  # log the state change, not every request
            self._failing = True
            log.warning("usage: cannot check limits (%s); pools fail %s until the database answers",
                        reason, ctx.options.usage_fail or "per their `fail` setting")
        if policy == "open":
            return None
        message = (f"Usage limits for pool '{checks[0].pool.name}' cannot be checked right now ({reason}); "
                   "the usage proxy is configured to refuse requests then (fail closed).")
        return Refusal(503, None, message)

    def _block(self, flow: http.HTTPFlow, call: Call, status: int, decision: Decision | None, message: str) -> None:
        call.blocked = True
        call.block_message = message
        if ctx.options.usage_block == "kill":
            flow.kill()
            return
        headers: dict[str, str] = {
            "content-type": "application/json",
            "x-should-retry": "false",
        }
        if decision is not None and decision.check is not None:
            now = self.ledger.clock() if self.ledger else None
            # A request larger than the whole limit gets no promise of a reset.
            if now is not None and decision.reason != "never":
                headers["retry-after"] = str(seconds_until(decision.resets_at, now))
            headers["x-usage-pool"] = decision.check.pool.name
            if decision.resets_at is not None and decision.reason != "never":
                headers["x-usage-resets-at"] = decision.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        error = refusal_error(status, message)
        flow.response = http.Response.make(status, json.dumps({"error": error}).encode(), headers)

    def on_dropped(self, rows: list[dict[str, Any]]) -> None:
        """Rows the writer gave up on (writer thread): what they held is spare again."""
        ledger = self.ledger
        if ledger is None:
            return
        for row in rows:
            held: Reservation | None = row.get("_reservation")
            if held:
                ledger.give_back(held.id, held.tokens, held.owner or "")
                if row.get("_settled"):
                    ledger.landed(held.id, held.owner or "", row["_settled"])

    def on_committed(self, rows: list[dict[str, Any]]) -> None:
        """Rows written (writer thread): settled usage is in the rows now, no longer the lease's to show."""
        ledger = self.ledger
        if ledger is None:
            return
        for row in rows:
            settled = row.get("_settled")
            if settled:
                held = row["_reservation"]
                ledger.landed(held.id, held.owner or "", settled)

    def on_row(self, call: Call, row: dict[str, Any]) -> None:
        # Settled at once: the request's usage counts in the ledger now (usage
        # beyond the estimate too); the SQLite ledger marks the row so that the
        # writer takes it off the lease in the transaction that inserts it
        # (store/inserts.insert_rows).
        self._remember(row, row.get("total_tokens") or 0)
        reservation: Reservation | None = call.extra.get("reservation")
        ledger = self.ledger
        if ledger is None:
            if reservation is not None:  # the writer still takes it off its row
                row["_reservation"] = reservation
            return
        if ledger.record(row, reservation) and self.executor is not None:
            try:  # the usage beyond the estimate goes into the database now, not at the next admission
                self.executor.submit(self._periodic, "pay_debts", ledger.pay_debts)
            except RuntimeError:
                pass  # shutting down

    def _remember(self, row: dict[str, Any], used: int) -> None:
        """Keep what a response used for a continuation that may follow at once."""
        if not used or not row.get("response_id"):
            return
        usage = PreviousUsage(row.get("input_tokens") or 0, row.get("output_tokens") or 0)
        keys = [row["response_id"]]
        if row.get("conversation"):
            keys.append("conversation:" + row["conversation"])
        for key in keys:
            self.recent[key] = usage
            self.recent.move_to_end(key)
        while len(self.recent) > RECENT_RESPONSES:
            self.recent.popitem(last=False)

    # -- commands ----------------------------------------------------------
    @command.command("usage.reset")
    def reset(self, pool: str) -> None:
        """Reset a pool: usage before now no longer counts in its window."""
        config = self.meter.config
        if config is None or pool not in config.pools:
            raise exceptions.CommandError(f"unknown pool {pool!r}")
        if self.executor is None or self.ledger is None:
            raise exceptions.CommandError("usage ledger is not running")
        ledger = self.ledger
        self.executor.submit(ledger.add_reset, pool, None, "usage.reset command")
        log.info("usage: pool %s reset", pool)
