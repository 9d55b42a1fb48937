"""WebSocket end to end: real mitmdump + addon, the official SDK's responses.connect() and
realtime.connect() as clients, the fake OpenAI server speaking both protocols."""

from __future__ import annotations

import json
import time

import pytest
from conftest import FAKE_KEY

pytest.importorskip("websockets")

TIGHT_CONFIG = """
timezone = "UTC"
default_pool = "premium"
estimate_output_tokens = 50

[pools.premium]
limit = {limit}
window = "day"
models = ["gpt-5", "gpt-4o", "gpt-realtime"]
"""


@pytest.fixture
def ws_env(monkeypatch):
    """Regular mode as a user sets it up: HTTPS_PROXY and the CA for the SDK's websockets client."""

    def setup(proxy) -> None:
        if proxy.mode == "regular":
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("SSL_CERT_FILE", proxy.ca)
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)

    return setup


def _client(proxy):
    import openai

    if proxy.mode == "regular":
        return openai.OpenAI(api_key=FAKE_KEY)
    return openai.OpenAI(api_key=FAKE_KEY, base_url=f"{proxy.url}/v1")


def _until(conn, kinds: set[str], timeout: float = 20) -> list:
    """Events up to and including the first whose type is in `kinds`."""
    events = []
    deadline = time.monotonic() + timeout
    for event in conn:
        events.append(event)
        if event.type in kinds:
            return events
        assert time.monotonic() < deadline, "no terminal event"
    raise AssertionError("socket closed before a terminal event")


def _ws_rows(proxy, count: int, timeout: float = 15) -> list[dict]:
    return proxy.wait_rows(count, "transport = 'websocket'", timeout=timeout)


def test_responses_websocket_rows_per_response(proxy, fake_server, ws_env):
    fake_server.state.clear()
    ws_env(proxy)
    client = _client(proxy)
    with client.responses.connect() as conn:
        for turn in range(3):
            conn.response.create(model="gpt-5", input=f"turn {turn} " + "word " * (10 * turn))
            events = _until(conn, {"response.completed"})
            assert events[-1].response.usage is not None
    rows = _ws_rows(proxy, 3)
    served = fake_server.state.usage_served("/v1/responses")
    assert len(rows) == 3 and len(served) == 3
    for row, usage in zip(rows, served, strict=True):
        assert row["outcome"] == "ok"
        assert row["endpoint"] == "responses" and row["transport"] == "websocket"
        assert row["input_tokens"] == usage["input_tokens"] and row["output_tokens"] == usage["output_tokens"]
        assert row["reasoning_tokens"] == 4 and row["total_tokens"] == usage["total_tokens"]
        assert row["model"] == "gpt-5-2025-08-07" and row["requested_model"] == "gpt-5" and row["pool"] == "premium"
        assert row["response_id"].startswith("resp_") and row["key_hint"] == "sk-…WXYZ"
        assert row["ttfb_ms"] is not None and 0 <= row["ttfb_ms"] <= row["latency_ms"]
    # The upgrade is no call of its own: no 101/no_usage row.
    assert proxy.rows("status = 101 and outcome = 'no_usage'") == []
    assert len(proxy.rows()) == 3


def test_realtime_rows_with_text_audio_usage(proxy, fake_server, ws_env):
    fake_server.state.clear()
    ws_env(proxy)
    client = _client(proxy)
    with client.realtime.connect(model="gpt-realtime") as conn:
        assert _until(conn, {"session.created"})[-1].session.model == "gpt-realtime"
        conn.session.update(session={"type": "realtime", "audio": {"input": {
            "transcription": {"model": "gpt-4o-mini-transcribe"}}}})
        _until(conn, {"session.updated"})
        conn.input_audio_buffer.commit()
        _until(conn, {"conversation.item.input_audio_transcription.completed"})
        conn.response.create()
        done = _until(conn, {"response.done"})[-1]
        assert done.response.usage.total_tokens == 290
    rows = _ws_rows(proxy, 2)
    assert [r["endpoint"] for r in rows] == ["realtime.transcription", "realtime"]
    transcription, response = rows
    assert transcription["model"] == "gpt-4o-mini-transcribe" and transcription["input_tokens"] == 25
    assert transcription["output_tokens"] == 6
    assert response["model"] == "gpt-realtime" and response["outcome"] == "ok"
    assert (response["input_tokens"], response["cached_tokens"], response["output_tokens"]) == (200, 64, 90)
    assert response["total_tokens"] == 290


def test_limits_over_websocket_refuse_each_response_create(make_proxy, fake_server, ws_env, tmp_path):
    """A 300-token pool on one socket: turns go through until the pool is spent, then each
    response.create is refused with an error event, never forwarded, and the socket stays open."""
    config = tmp_path / "tight.toml"
    config.write_text(TIGHT_CONFIG.format(limit=300))
    proxy = make_proxy(mode="reverse", options={"usage_config": str(config)})
    fake_server.state.clear()
    ws_env(proxy)
    client = _client(proxy)
    refusals = []
    with client.responses.connect() as conn:
        for turn in range(20):
            conn.response.create(model="gpt-5", input=f"turn {turn} " + "word " * 20)
            last = _until(conn, {"response.completed", "error"})[-1]
            if last.type == "error":
                refusals.append(last)
        # The socket is still open after the refusals: a last refused turn answers.
        conn.response.create(model="gpt-5", input="turn 20 " + "word " * 20)
        assert _until(conn, {"response.completed", "error"})[-1].type == "error"
    assert refusals, "the pool was never enforced"
    error = refusals[0].error
    assert error.code == "usage_limit_exceeded" and error.type == "insufficient_quota"
    assert "premium" in error.message and "300" in error.message
    rows = proxy.wait_rows(21, "transport = 'websocket'")
    ok = [r for r in rows if r["outcome"] == "ok"]
    blocked = [r for r in rows if r["outcome"] == "blocked"]
    assert len(ok) + len(blocked) == 21 and len(blocked) == len(refusals) + 1
    # Nothing refused reached upstream: the fake saw exactly the admitted creates.
    sent = [m for r in fake_server.state.calls("/v1/responses") for m in r.ws_messages]
    assert len(sent) == len(ok)
    used = sum(r["total_tokens"] for r in ok)
    # Overshoot at most one response.
    assert used - max(r["total_tokens"] for r in ok) <= 300


def test_realtime_upgrade_refused_when_pool_spent(make_proxy, fake_server, ws_env, tmp_path):
    import openai

    config = tmp_path / "tight.toml"
    config.write_text(TIGHT_CONFIG.format(limit=100))
    proxy = make_proxy(mode="reverse", options={"usage_config": str(config)})
    fake_server.state.clear()
    client = _client(proxy)
    with client.realtime.connect(model="gpt-realtime") as conn:  # pool not spent: the upgrade goes through
        _until(conn, {"session.created"})
        conn.response.create()
        assert _until(conn, {"response.done", "error"})[-1].type == "response.done"  # 290 tokens > 100
        # The pool is spent: the next response.create is refused on the open socket, in Realtime's envelope.
        conn.send({"type": "response.create", "event_id": "evt_client_2"})
        refused = _until(conn, {"response.done", "error"})[-1]
        assert refused.type == "error" and refused.error.code == "usage_limit_exceeded"
        assert refused.error.event_id == "evt_client_2" and "premium" in refused.error.message
    rows = _ws_rows(proxy, 2)
    assert rows[0]["total_tokens"] == 290 and rows[1]["outcome"] == "blocked"
    assert len([m for r in fake_server.state.calls("/v1/realtime") for m in r.ws_messages]) == 1
    upstream_before = len(fake_server.state.calls("/v1/realtime"))
    with pytest.raises(Exception) as refused:  # noqa: B017 - the SDK wraps the handshake failure
        with client.realtime.connect(model="gpt-realtime") as conn:
            conn.recv()
    assert "429" in str(refused.value) or isinstance(refused.value, openai.OpenAIError)
    assert len(fake_server.state.calls("/v1/realtime")) == upstream_before
    blocked = proxy.wait_rows(2, "outcome = 'blocked'")[1:]
    assert blocked and blocked[0]["status"] == 429 and blocked[0]["endpoint"] == "realtime"


def test_multiplexed_responses_matched_by_stream_id(make_proxy, fake_server):
    """Two lanes on one socket, events interleaved: each row gets its own response's usage."""
    from websockets.sync.client import connect

    proxy = make_proxy(mode="reverse")
    fake_server.state.clear()
    with connect(f"ws://127.0.0.1:{proxy.port}/v1/responses",
                 additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "gpt-5", "stream_id": "a",
                            "input": "short", "metadata": {"fake_delay": "0.05"}}))
        ws.send(json.dumps({"type": "response.create", "model": "gpt-4o", "stream_id": "b",
                            "input": "a much longer input " * 30, "metadata": {"fake_delay": "0.03"}}))
        done: dict[str, dict] = {}
        while len(done) < 2:
            event = json.loads(ws.recv(timeout=20))
            if event["type"] == "response.completed":
                done[event["stream_id"]] = event["response"]["usage"]
    rows = _ws_rows(proxy, 2)
    by_model = {r["requested_model"]: r for r in rows}
    assert by_model["gpt-5"]["input_tokens"] == done["a"]["input_tokens"]
    assert by_model["gpt-4o"]["input_tokens"] == done["b"]["input_tokens"]
    assert done["a"]["input_tokens"] != done["b"]["input_tokens"]


@pytest.mark.parametrize("who", ["client", "server"])
def test_abort_mid_response_gives_aborted_row(make_proxy, fake_server, who, tmp_path):
    from websockets.sync.client import connect

    config = tmp_path / "pool.toml"
    config.write_text(TIGHT_CONFIG.format(limit=1_000_000))
    proxy = make_proxy(mode="reverse", options={"usage_config": str(config)})
    fake_server.state.clear()
    behavior = "stall" if who == "client" else "close"
    with connect(f"ws://127.0.0.1:{proxy.port}/v1/responses",
                 additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "gpt-5", "input": "hi",
                            "metadata": {"fake_behavior": behavior, "fake_stall": "30"}}))
        assert json.loads(ws.recv(timeout=20))["type"] == "response.created"
        if who == "server":
            with pytest.raises(Exception):  # noqa: B017 - the server closes the socket
                ws.recv(timeout=20)
    rows = _ws_rows(proxy, 1)
    assert rows[0]["outcome"] == "aborted" and rows[0]["total_tokens"] is None
    assert who in rows[0]["error"]
    # The reservation went back: once the lease's spare tokens go back too (idle 10 s),
    # nothing is held for the pool (an unsettled response would hold its estimate).
    deadline = time.monotonic() + 30
    import sqlite3

    while time.monotonic() < deadline:
        with sqlite3.connect(proxy.db) as db:
            held = db.execute("select coalesce(sum(tokens), 0) from reservations").fetchone()[0]
        if held == 0:
            break
        time.sleep(0.2)
    assert held == 0


def test_proxy_stop_mid_response_records_aborted(make_proxy, fake_server):
    from websockets.sync.client import connect

    proxy = make_proxy(mode="reverse")
    with connect(f"ws://127.0.0.1:{proxy.port}/v1/responses",
                 additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "gpt-5", "input": "hi",
                            "metadata": {"fake_behavior": "stall", "fake_stall": "30"}}))
        assert json.loads(ws.recv(timeout=20))["type"] == "response.created"
        proxy.stop()
    rows = proxy.rows("transport = 'websocket'")
    assert len(rows) == 1 and rows[0]["outcome"] == "aborted" and "shut down" in rows[0]["error"]


def test_hostile_frames_never_stop_forwarding(make_proxy, fake_server):
    """Binary, non-JSON, unknown types, a JSON array, a 20 MB frame, a terminal event
    without usage, and hostile client frames: all forwarded, the proxy keeps metering."""
    from websockets.sync.client import connect

    proxy = make_proxy(mode="reverse")
    fake_server.state.clear()
    with connect(f"ws://127.0.0.1:{proxy.port}/v1/responses", max_size=None,
                 additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}) as ws:
        ws.send(b"\x00binary from the client")
        ws.send("not json from the client {")
        ws.send(json.dumps({"nested": {"type": "response.create"}, "type": "response.steer"}))
        for _ in range(2):  # the fake's answers to the binary and the non-JSON frames
            assert json.loads(ws.recv(timeout=20))["type"] == "error"
        for behavior in ("hostile", "huge-frame", "no-usage", ""):
            ws.send(json.dumps({"type": "response.create", "model": "gpt-5", "input": "x",
                                "metadata": {"fake_behavior": behavior}}))
            frames = []
            while True:
                frame = ws.recv(timeout=60)
                frames.append(frame)
                if isinstance(frame, str) and frame.startswith('{"type":"response.completed"'):
                    break
            if behavior == "hostile":
                assert frames[0] == b"\x00\x01binary\xff" and frames[1] == "this is not JSON {"
            if behavior == "huge-frame":
                assert max(len(f) for f in frames) > 20 * 1024 * 1024
        # A response.create too big to parse (5 MB of context): forwarded, model found by a scan.
        ws.send(json.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "y" * (5 << 20)}))
        while not (frame := ws.recv(timeout=60)).startswith('{"type":"response.completed"'):
            pass
    rows = _ws_rows(proxy, 5, timeout=30)
    assert [r["outcome"] for r in rows] == ["ok", "ok", "no_usage", "ok", "ok"]
    assert rows[2]["error"] and rows[3]["total_tokens"] > 0
    assert rows[4]["requested_model"] == "gpt-4o-mini" and rows[4]["input_tokens"] > 1_000_000
    # The client's frames all reached upstream, unchanged in number.
    received = [m for r in fake_server.state.calls("/v1/responses") for m in r.ws_messages]
    assert len(received) == 3 + 5
    assert "Traceback" not in proxy.log()


def test_error_event_is_an_error_row(make_proxy, fake_server):
    from websockets.sync.client import connect

    proxy = make_proxy(mode="reverse")
    with connect(f"ws://127.0.0.1:{proxy.port}/v1/responses",
                 additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "gpt-5", "input": "x",
                            "metadata": {"fake_behavior": "error-event"}}))
        assert json.loads(ws.recv(timeout=20))["type"] == "error"
    rows = _ws_rows(proxy, 1)
    assert rows[0]["outcome"] == "error" and "fake error event" in rows[0]["error"]


def test_refused_upgrade_is_an_error_row(make_proxy, fake_server):
    from websockets.sync.client import connect

    proxy = make_proxy(mode="reverse")
    fake_server.state.clear()
    fake_server.state.websocket_refuse = True
    try:
        with pytest.raises(Exception):  # noqa: B017 - InvalidStatus
            with connect(f"ws://127.0.0.1:{proxy.port}/v1/responses",
                         additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}):
                pass
    finally:
        fake_server.state.websocket_refuse = False
    rows = proxy.wait_rows(1)
    assert rows[0]["status"] == 426 and rows[0]["outcome"] == "error" and rows[0]["transport"] == "websocket"


def test_kill_mode_closes_the_socket(make_proxy, fake_server, tmp_path):
    from websockets.sync.client import connect

    config = tmp_path / "tight.toml"
    config.write_text(TIGHT_CONFIG.format(limit=10))
    proxy = make_proxy(mode="reverse", options={"usage_config": str(config), "usage_block": "kill"})
    fake_server.state.clear()
    with connect(f"ws://127.0.0.1:{proxy.port}/v1/responses",
                 additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "gpt-5", "input": "word " * 200}))
        with pytest.raises(Exception):  # noqa: B017 - ConnectionClosed
            ws.recv(timeout=20)
    assert [m for r in fake_server.state.calls("/v1/responses") for m in r.ws_messages] == []
    assert proxy.wait_rows(1, "outcome = 'blocked'")


