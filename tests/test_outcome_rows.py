"""The outcome rules (metering/outcome.py) and the row builder (metering/rows.py), without mitmproxy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest

from addon.metering import outcome, rows, wire


def _stream(**values: Any) -> wire.StreamMeter:
    meter = wire.StreamMeter()
    for name, value in values.items():
        setattr(meter, name, value)
    return meter


USAGE = wire.Usage(input_tokens=11, output_tokens=7, total_tokens=18)


@pytest.mark.parametrize(("status", "broken", "facts", "expected"), [
    (200, None, _stream(usage=USAGE, done=True), ("ok", None)),
    (200, "SSE event larger than 16 bytes", _stream(usage=USAGE), ("no_usage", "SSE event larger than 16 bytes")),
    (200, None, _stream(error="server_error: boom", usage=USAGE), ("error", "server_error: boom")),
    (503, None, _stream(), ("error", "HTTP 503")),
    (200, None, _stream(), ("no_usage", "stream ended without usage")),
])
def test_stream_outcomes(status, broken, facts, expected):
    assert outcome.of_stream(status, broken, facts) == expected


@pytest.mark.parametrize(("status", "endpoint", "facts", "expected"), [
    (200, "chat.completions", wire.BodyFacts(usage=USAGE), ("ok", None)),
    (429, "chat.completions", wire.BodyFacts(error="Rate limit reached"), ("error", "Rate limit reached")),
    (500, "chat.completions", wire.BodyFacts(), ("error", "HTTP 500")),
    (200, "chat.completions", wire.BodyFacts(), ("no_usage", "response carried no usage")),
    (200, "chat.completions", wire.BodyFacts(error="response is not valid JSON"),
     ("no_usage", "response is not valid JSON")),
    (200, "responses", wire.BodyFacts(status="queued"), ("ok", None)),  # background: usage comes with a poll
    (200, "responses", wire.BodyFacts(status="in_progress"), ("ok", None)),
    (200, "images.generations", wire.BodyFacts(data_items=2), ("ok", None)),  # per-image models: no usage object
    (200, "models", wire.BodyFacts(), ("ok", None)),  # not a usage endpoint
])
def test_body_outcomes(status, endpoint, facts, expected):
    assert outcome.of_body(status, endpoint, facts) == expected


@pytest.mark.parametrize(("message", "streamed", "complete", "expected"), [
    ("Server disconnected", False, True, ("error", 502)),  # upstream failed before an answer: mitmproxy's 502
    ("Client disconnected", False, True, ("aborted", None)),
    ("Connection killed", False, True, ("aborted", None)),
    ("Server disconnected", True, True, ("aborted", None)),  # a stream cut after it began
    ("Server disconnected", False, False, ("aborted", None)),  # the request never arrived whole
])
def test_connection_error_outcomes(message, streamed, complete, expected):
    assert outcome.of_connection_error(message, streamed, complete) == expected


def test_at_shutdown_only_a_finished_stream_with_usage_is_complete():
    assert outcome.at_shutdown(_stream(usage=USAGE, done=True), None)
    assert not outcome.at_shutdown(_stream(usage=USAGE, done=False), None)
    assert not outcome.at_shutdown(_stream(done=True), None)
    assert not outcome.at_shutdown(_stream(usage=USAGE, done=True), "stream parsing failed")
    assert not outcome.at_shutdown(None, None)


@dataclass
class _Call:
    """A CallFacts: what addon/proxy/meter.Call carries, without mitmproxy."""

    started: float = 1_764_460_800.0  # 2025-11-30T00:00:00Z
    host: str = "api.openai.com"
    method: str = "POST"
    path: str = "/v1/chat/completions"
    endpoint: wire.Endpoint = field(default_factory=lambda: wire.Endpoint("chat.completions"))
    request: wire.RequestFacts = field(default_factory=lambda: wire.RequestFacts(model="gpt-4o-mini"))
    key_id: str | None = "k1"
    key_hint: str | None = "sk-…abcd"
    label: str | None = None
    project: str | None = None
    user_agent: str | None = "test/1"
    pool: str | None = None
    streamed: bool = False
    transport: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _row(call: _Call, result: str = "ok", **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("end", call.started + 0.25)
    kwargs.setdefault("headers", {"x-request-id": "req_1"})
    return rows.build_row(call, result, day=lambda instant: instant.date().isoformat(),
                          pool_for=lambda model: "mini" if "mini" in model else "premium", **kwargs)


def test_a_row_of_an_ok_call():
    facts = wire.BodyFacts(usage=USAGE, model="gpt-4o-mini-2024-07-18", response_id="chatcmpl-1")
    row = _row(_Call(), facts=facts, status=200, ttfb=123.44)
    assert row["ts"] == "2025-11-30T00:00:00.000Z" and row["day"] == "2025-11-30"
    assert (row["model"], row["requested_model"], row["pool"]) == ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", "mini")
    assert (row["outcome"], row["status"], row["latency_ms"], row["ttfb_ms"]) == ("ok", 200, 250.0, 123.4)
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (11, 7, 18)
    assert (row["request_id"], row["response_id"], row["transport"], row["streamed"]) == \
        ("req_1", "chatcmpl-1", "http", 0)
    assert row["processing"] == "standard" and row["error"] is None


def test_the_call_s_pool_wins_and_the_transport_follows_the_stream():
    row = _row(_Call(pool="team", streamed=True), facts=_stream(usage=USAGE), status=200)
    assert row["pool"] == "team" and row["transport"] == "sse" and row["streamed"] == 1
    ws = _row(_Call(transport="websocket"), facts=_stream(usage=USAGE), status=101)
    assert ws["transport"] == "websocket"


def test_implausible_usage_is_dropped_and_the_call_is_no_usage(caplog):
    lie = wire.Usage(input_tokens=-5, output_tokens=7, total_tokens=2)
    with caplog.at_level(logging.WARNING, logger="addon.metering.rows"):
        row = _row(_Call(), facts=wire.BodyFacts(usage=lie), status=200)
    assert row["outcome"] == "no_usage" and row.get("total_tokens") is None and "negative" in row["error"]
    assert "implausible usage" in caplog.text


def test_a_batch_counts_its_usage_once_final_and_in_the_batch_pool():
    call = _Call(method="GET", path="/v1/batches/batch_1", endpoint=wire.Endpoint("batches"))
    running = rows.build_row(call, "ok", facts=wire.BodyFacts(usage=USAGE, status="in_progress"), end=call.started,
                             headers={}, day=lambda i: "d", batch_pool="batch")
    assert running.get("total_tokens") is None and running["pool"] == "batch" and running["processing"] == "batch"
    done = rows.build_row(call, "ok", facts=wire.BodyFacts(usage=USAGE, status="completed"), end=call.started,
                          headers={}, day=lambda i: "d", batch_pool="batch")
    assert done["total_tokens"] == 18


def test_a_stored_completion_read_back_counts_nothing():
    row = _row(_Call(method="GET", path="/v1/chat/completions/chatcmpl-1"), facts=wire.BodyFacts(usage=USAGE))
    assert row.get("total_tokens") is None and row["outcome"] == "ok"


def test_errors_and_notes():
    noted = _Call(extra={"body_note": "request body too large; not fully parsed"})
    assert _row(noted)["error"] == "request body too large; not fully parsed"
    assert _row(noted, "error", error="HTTP 500", status=500)["error"] == "HTTP 500"
    row = _row(_Call(project=None), "aborted", headers={"openai-project": "proj_1"})
    assert row["project"] == "proj_1" and row["status"] is None and row["request_id"] is None


def test_the_local_day_is_the_caller_s():
    seen: list[datetime] = []
    row = rows.build_row(_Call(), "ok", end=1.0, headers={}, day=lambda instant: seen.append(instant) or "local")
    assert row["day"] == "local" and seen[0].tzinfo is not None
