"""The meter's hooks in process (mitmproxy's taddons and tflow): the outcome and row rules, one call at a time.

The end-to-end tests drive the same code through mitmdump and real clients; here each rule is one flow.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addon.proxy import chain
from addon.proxy.issued_keys import IssuedKeys
from addon.proxy.limits import Limits
from addon.proxy.meter import UsageMeter
from addon.proxy.pricing import Pricing

KEY = "sk-proj-hooktest0123456789abcd"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def _flow(path: str = "/v1/chat/completions", body: dict | None = None, host: str = "api.openai.com") -> http.HTTPFlow:
    request = tutils.treq(host=host, port=443, scheme=b"https", method=b"POST", path=path.encode(),
                          headers=http.Headers(((b"content-type", b"application/json"),
                                                (b"authorization", f"Bearer {KEY}".encode()))),
                          content=json.dumps(body if body is not None else CHAT).encode())
    return tflow.tflow(req=request)


def _answer(flow: http.HTTPFlow, status: int, body: Any, content_type: str = "application/json") -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    flow.response = tutils.tresp(status_code=status, content=content,
                                 headers=http.Headers(((b"content-type", content_type.encode()),)))


def _run(meter: UsageMeter, flow: http.HTTPFlow) -> None:
    assert meter.request(flow) is None  # small bodies are read on the loop
    if flow.response is not None:
        meter.responseheaders(flow)
        assert meter.response(flow) is None


def _rows(meter: UsageMeter) -> list[dict[str, Any]]:
    assert meter.writer is not None and meter.writer.flush()
    conn = sqlite3.connect(meter.writer.path)
    conn.row_factory = sqlite3.Row
    try:
        if not conn.execute("select 1 from sqlite_master where name = 'requests'").fetchone():
            return []  # nothing was ever written
        return [dict(r) for r in conn.execute("select * from requests order by id")]
    finally:
        conn.close()


@pytest.fixture
def meter(tmp_path):
    addon = UsageMeter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, usage_db=str(tmp_path / "usage.db"))
        yield addon
        addon.done()


def test_a_call_with_usage_is_one_ok_row(meter):
    flow = _flow()
    _run(meter, flow)
    _answer(flow, 200, {"id": "chatcmpl-1", "model": "gpt-4o-mini-2024-07-18", "choices": [], "usage": USAGE})
    meter.responseheaders(flow)
    assert meter.response(flow) is None
    [row] = _rows(meter)
    assert (row["outcome"], row["endpoint"], row["model"], row["pool"]) == \
        ("ok", "chat.completions", "gpt-4o-mini-2024-07-18", "mini")
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (11, 7, 18)
    assert row["key_hint"] == "sk-…abcd" and KEY not in json.dumps(row)


@pytest.mark.parametrize(("status", "body", "outcome", "error"), [
    (429, {"error": {"message": "Rate limit reached", "type": "requests"}}, "error", "Rate limit reached"),
    (500, b"<html>oops</html>", "error", "not valid JSON"),
    (200, {"id": "chatcmpl-2", "choices": []}, "no_usage", "response carried no usage"),
    (200, {"id": "resp_1", "object": "response", "status": "queued"}, "ok", None),
])
def test_outcome_rules(meter, status, body, outcome, error):
    path = "/v1/responses" if isinstance(body, dict) and body.get("object") == "response" else "/v1/chat/completions"
    flow = _flow(path, {"model": "gpt-4o", "input": "hi"} if path == "/v1/responses" else CHAT)
    meter.request(flow)
    _answer(flow, status, body)
    meter.responseheaders(flow)
    meter.response(flow)
    [row] = _rows(meter)
    assert row["outcome"] == outcome and row["status"] == status
    assert row["error"] is None if error is None else error in row["error"]
    assert row["total_tokens"] is None


def test_a_connection_error_is_an_aborted_row(meter):
    flow = _flow()
    meter.request(flow)
    flow.error = tflow.terr("connection killed")
    meter.error(flow)
    [row] = _rows(meter)
    assert row["outcome"] in ("aborted", "error") and row["total_tokens"] is None
    assert "connection killed" in (row["error"] or "")


def test_unmetered_hosts_and_endpoints_leave_no_row(meter):
    other = _flow(host="example.com")
    meter.request(other)
    _answer(other, 200, {"usage": USAGE})
    meter.responseheaders(other)
    meter.response(other)
    assert other.id not in meter.calls and _rows(meter) == []


def test_the_addon_order_is_checked():
    addons = chain.build()
    kinds = [type(a) for a in addons]
    assert kinds.index(IssuedKeys) < kinds.index(UsageMeter) < kinds.index(Limits)
    assert kinds.index(UsageMeter) < kinds.index(Pricing)
    meter = next(a for a in addons if isinstance(a, UsageMeter))
    limits = next(a for a in addons if isinstance(a, Limits))
    assert meter.listeners == [limits]
    swapped = list(addons)
    i, j = kinds.index(UsageMeter), kinds.index(Limits)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(ValueError, match="UsageMeter must come before Limits"):
        chain.check_order(swapped)
    with pytest.raises(ValueError, match="IssuedKeys must come before UsageMeter"):
        chain.check_order([a for a in addons if not isinstance(a, IssuedKeys)])


def test_periodic_ledger_failures_warn_once_per_change_of_state(caplog):
    limits = Limits(UsageMeter())
    state = {"fail": True}

    def step() -> None:
        if state["fail"]:
            raise OSError("disk I/O error")

    with caplog.at_level(logging.INFO, logger="addon.proxy.limits"):
        for _ in range(3):
            limits._periodic("release_idle", step)
        state["fail"] = False
        for _ in range(2):
            limits._periodic("release_idle", step)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "addon.proxy.limits"]
    assert messages == [
        (logging.WARNING, "usage: periodic ledger work (release_idle) failed: disk I/O error; retrying quietly"),
        (logging.INFO, "usage: periodic ledger work (release_idle) works again"),
    ]


def test_an_upstream_failure_before_the_answer_is_an_error_row_with_mitmproxy_s_502(meter):
    flow = _flow()
    meter.request(flow)
    flow.error = tflow.terr("Server disconnected")
    meter.error(flow)
    [row] = _rows(meter)
    assert (row["outcome"], row["status"]) == ("error", 502) and "Server disconnected" in row["error"]


def test_an_unfinished_stream_at_shutdown_is_aborted_and_its_flow_killed(tmp_path):
    meter = UsageMeter()
    with taddons.context(meter) as tctx:
        tctx.configure(meter, usage_db=str(tmp_path / "usage.db"))
        flow = _flow(body={**CHAT, "stream": True})
        meter.request(flow)
        _answer(flow, 200, b"", content_type="text/event-stream")
        meter.responseheaders(flow)
        assert flow.response.stream is not None
        flow.response.stream(b'data: {"id":"chatcmpl-9","choices":[]}\n\n')
        tctx.master.should_exit.set()
        meter.done()
        conn = sqlite3.connect(meter.writer.path)
        (outcome, transport), = conn.execute("select outcome, transport from requests").fetchall()
        conn.close()
    assert (outcome, transport) == ("aborted", "sse") and flow.error is not None
