"""The `requests` row of a finished call: one builder for HTTP exchanges and WebSocket responses.

Pure (no mitmproxy, no SQLite): the proxy's meter gathers what it knows of
a call (a `CallFacts`), what the answer said (`facts`: stream, body or
WebSocket event facts, anything with the attributes read below) and the
outcome (metering/outcome.py); `build_row` turns them into the row the
writer inserts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from addon.metering import wire
from addon.metering.redact import redact_url
from addon.windows import iso_utc

log = logging.getLogger(__name__)

# Batch statuses after which a batch's `usage` is final (and billed).
BATCH_FINAL_STATUSES = frozenset({"completed", "expired", "cancelled", "failed"})


class CallFacts(Protocol):
    """What the proxy knew of a call when it ended (addon/proxy/meter.Call)."""

    started: float
    host: str
    method: str
    path: str
    endpoint: wire.Endpoint
    request: wire.RequestFacts
    key_id: str | None
    key_hint: str | None
    label: str | None
    project: str | None
    user_agent: str | None
    pool: str | None
    streamed: bool
    transport: str | None
    extra: dict[str, Any]


def build_row(call: CallFacts, outcome: str, *, facts: Any = None, error: str | None = None,
              status: int | None = None, ttfb: float | None = None, end: float,
              headers: Mapping[str, str], day: Callable[[datetime], str],
              pool_for: Callable[[str], str | None] | None = None, batch_pool: str | None = None) -> dict[str, Any]:
    """The row of a finished call.

    `ttfb` in ms from `call.started`, `end` a timestamp; `headers` the
    response's (lower-cased names); `day` gives the local day of an instant,
    `pool_for` the pool of a model (for calls classified without one),
    `batch_pool` the configured pool of batches. Usage that cannot be true is
    dropped (logged), and an `ok` call without it becomes `no_usage`.
    """
    usage = getattr(facts, "usage", None) if facts is not None else None
    response_id = getattr(facts, "response_id", None) or call.endpoint.response_id
    model = getattr(facts, "model", None) or call.request.model or call.endpoint.deployment
    pool = call.pool or (pool_for(model) if model and pool_for else None)
    processing = None
    if call.endpoint.name == "batches":
        # A batch's usage is final, and billed, once the batch is; its
        # rows are counted once per batch id like responses (store/inserts.insert_rows).
        processing = "batch"
        if getattr(facts, "status", None) not in BATCH_FINAL_STATUSES:
            usage = None
        if batch_pool:
            pool = batch_pool
    elif call.method == "GET" and call.endpoint.name in ("chat.completions", "completions"):
        usage = None  # a stored completion read back: counted when it was made
    if usage is not None and (implausible := wire.implausible_usage(usage)):
        # A hostile or broken answer must not move a pool (least of all down).
        log.warning("usage: %s %s answered implausible usage (%s); recorded without usage",
                    call.method, redact_url(call.path), implausible)
        usage = None
        if outcome == "ok":
            outcome = "no_usage"
        error = error or implausible
    started = datetime.fromtimestamp(call.started, timezone.utc)
    service_tier = wire.billed_service_tier(getattr(facts, "service_tier", None), call.request.service_tier)
    row: dict[str, Any] = {
        "ts": iso_utc(started),
        "day": day(started),
        "host": call.host,
        "method": call.method,
        "path": call.path,
        "endpoint": call.endpoint.name,
        "model": model,
        "requested_model": call.request.model,
        "pool": pool,
        "status": status,
        "outcome": outcome,
        "streamed": int(call.streamed or call.request.stream),
        "latency_ms": round((end - call.started) * 1000, 1),
        "ttfb_ms": round(ttfb, 1) if ttfb is not None else None,
        "key_id": call.key_id,
        "key_hint": call.key_hint,
        "label": call.label,
        "project": call.project or headers.get("openai-project"),
        "request_id": headers.get("x-request-id"),
        "service_tier": service_tier,
        "user_agent": call.user_agent,
        "error": error or call.extra.get("body_note"),
        "response_id": response_id,
        "transport": call.transport or ("sse" if call.streamed else "http"),
        "conversation": call.request.conversation,
        "processing": processing or wire.processing_of(service_tier),
    }
    if outcome == "ok":
        usage = wire.complete_usage(call.endpoint.name, usage, call.request, facts)
    if call.request.image_size or call.request.image_quality:
        row["image_size"], row["image_quality"] = call.request.image_size, call.request.image_quality
    if usage is not None:
        row.update(usage.as_columns())
    return row
