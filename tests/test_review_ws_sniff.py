"""Review: a response.create that JSON parsers read as one, but not in the byte layout the sniffer expects
(leading whitespace, an escaped character in the type), must still be metered and limited."""

from __future__ import annotations

import json

import pytest
from conftest import FAKE_KEY

pytest.importorskip("websockets")

CONFIG = """
timezone = "UTC"
default_pool = "premium"
estimate_output_tokens = 50

[pools.premium]
limit = 300
window = "day"
models = ["gpt-5"]
"""

SHAPES = {
    "leading-space": lambda body: " " + body,
    "leading-newline": lambda body: "\n" + body,
    "escaped-type": lambda body: body.replace('"response.create"', '"response\\u002ecreate"', 1),
    # JSON parsers keep the last of repeated keys.
    "repeated-type": lambda body: body.replace('{"type": "response.create"',
                                               '{"type": "conversation.item.create", "type": "response.create"', 1),
    # The same JSON in a binary frame (a server that decodes either kind of frame acts on it).
    "binary": lambda body: body.encode(),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_disguised_response_create_is_limited(make_proxy, fake_server, tmp_path, shape):
    from websockets.sync.client import connect

    config = tmp_path / "tight.toml"
    config.write_text(CONFIG)
    proxy = make_proxy(mode="reverse", options={"usage_config": str(config)})
    fake_server.state.clear()
    turns = 12
    with connect(f"ws://127.0.0.1:{proxy.port}/v1/responses",
                 additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}) as ws:
        for turn in range(turns):
            body = json.dumps({"type": "response.create", "model": "gpt-5", "input": f"turn {turn} " + "word " * 20})
            ws.send(SHAPES[shape](body))
            while True:
                event = json.loads(ws.recv(timeout=20))
                if event["type"] in ("response.completed", "error"):
                    break
    served = [u for r in fake_server.state.calls("/v1/responses") for u in r.ws_usages]
    rows = proxy.wait_rows(turns, "transport = 'websocket'", timeout=15)
    # Every turn is a row (ok or blocked), and upstream served no more than the limit allows (+ one response).
    assert len(rows) == turns
    assert sum(u["total_tokens"] for u in served) - max(u["total_tokens"] for u in served) <= 300


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_client_event_reads_what_json_reads(shape):
    from addon.metering import ws_events

    body = json.dumps({"type": "response.create", "model": "gpt-5", "input": "hi"})
    frame = SHAPES[shape](body)
    kind, obj = ws_events.client_event(frame if isinstance(frame, bytes) else frame.encode(), ws_events.CLIENT_EVENTS)
    assert kind == "response.create" and obj is not None and obj["model"] == "gpt-5"
    audio = json.dumps({"type": "input_audio_buffer.append", "audio": "QUJD" * 1000}).encode()
    assert ws_events.client_event(audio, ws_events.CLIENT_EVENTS) == (None, None)
