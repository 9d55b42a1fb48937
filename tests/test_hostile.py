"""Hostile input: odd request bodies and upstream answers never break the proxy.

End to end through a real mitmdump, plus property tests (hypothesis) that
throw arbitrary bytes and JSON at the SSE parser, the stream tap and the
usage extraction: they may find nothing, but they never raise.
"""

from __future__ import annotations

import gzip
import json

import httpx
import psutil
import pytest
from conftest import FAKE_KEY, ROOT, start_proxy
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.metering import wire
from addon.metering.sse import SSEEvent, SSEOverflow, SSEParser
from addon.metering.stream_tap import StreamTap

CHAT = "/v1/chat/completions"
AUTH = {"authorization": f"Bearer {FAKE_KEY}"}


@pytest.fixture(scope="module")
def rproxy(tmp_path_factory, confdir, fake_server):
    tmp = tmp_path_factory.mktemp("hostile")
    config = tmp / "track.toml"  # track only: a 50 MB prompt would (rightly) be over a daily limit
    config.write_text('timezone = "UTC"\ndefault_pool = "all"\n[pools.all]\nwindow = "day"\nmodels = ["*"]\n')
    proxy = start_proxy(tmp, confdir, fake_server.port, mode="reverse", options={"usage_config": str(config)})
    yield proxy
    proxy.stop()


def one_row(proxy, marker: str) -> dict:
    rows = proxy.wait_rows(1, "user_agent = ?", (marker,), timeout=30)
    assert len(rows) == 1, rows
    assert f'File "{ROOT / "addon"}' not in proxy.log()  # no traceback from our code
    return rows[0]


@pytest.mark.parametrize(
    ("name", "content", "headers"),
    [
        ("not-json", b"{this is not json", {"content-type": "application/json"}),
        ("array", b'[{"model": "gpt-4o"}]', {"content-type": "application/json"}),
        ("model-int", b'{"model": 5, "stream": "yes", "stream_options": 3, "messages": []}',
         {"content-type": "application/json"}),
        ("model-object", b'{"model": {"a": [1]}, "messages": null}', {"content-type": "application/json"}),
        ("deep", b"[" * 100_000 + b"]" * 100_000, {"content-type": "application/json"}),
        ("bad-encoding", gzip.compress(b'{"model": "gpt-4o"}'), {"content-type": "application/json",
                                                                 "content-encoding": "x-unknown"}),
        ("broken-gzip", b"\x1f\x8b\x08not really gzip", {"content-type": "application/json",
                                                          "content-encoding": "gzip"}),
    ],
)
def test_odd_request_bodies(rproxy, name, content, headers):
    marker = f"hostile-{name}"
    r = httpx.post(f"{rproxy.url}{CHAT}", content=content, headers={**AUTH, **headers, "user-agent": marker},
                   timeout=30)
    # Forwarded as is; the fake server itself may choke on some (then: 502).
    assert r.status_code in (200, 502)
    row = one_row(rproxy, marker)
    assert row["endpoint"] == "chat.completions" and row["status"] == r.status_code


def test_50_mb_request(rproxy):
    marker = "hostile-50mb"
    content = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"a" * 50_000_000 + b'"}]}'
    r = httpx.post(f"{rproxy.url}{CHAT}", content=content, timeout=120,
                   headers={**AUTH, "content-type": "application/json", "user-agent": marker})
    assert r.status_code == 200
    row = one_row(rproxy, marker)
    assert row["requested_model"] == "gpt-4o-mini" and row["outcome"] == "ok"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_invalid_utf8_answer(rproxy, stream):
    marker = f"hostile-utf8-{stream}"
    r = httpx.post(f"{rproxy.url}{CHAT}", json={"model": "gpt-4o-mini", "messages": [], "stream": stream},
                   headers={**AUTH, "x-fake-behavior": "invalid-utf8", "x-fake-encoding": "identity",
                            "user-agent": marker}, timeout=30)
    assert r.status_code == 200
    assert b"\xff" in r.content  # forwarded untouched
    row = one_row(rproxy, marker)
    assert row["outcome"] in ("ok", "no_usage")


@pytest.mark.parametrize("behavior", ["huge-frame", "endless-frame"])
def test_oversized_sse_frames_keep_memory_bounded(rproxy, behavior):
    """A 20 MB frame or 40 MB without a blank line: forwarded whole, parsing given up, memory bounded."""
    marker = f"hostile-{behavior}"
    process = psutil.Process(rproxy.proc.pid)
    before = process.memory_info().rss
    received = 0
    with httpx.stream("POST", f"{rproxy.url}{CHAT}", timeout=60,
                      json={"model": "gpt-4o-mini", "messages": [], "stream": True},
                      headers={**AUTH, "x-fake-behavior": behavior, "user-agent": marker}) as r:
        for chunk in r.iter_raw():
            received += len(chunk)
    assert received > 20_000_000
    row = one_row(rproxy, marker)
    assert row["outcome"] == "no_usage" and "larger than" in row["error"]
    growth = process.memory_info().rss - before
    assert growth < 150_000_000, f"RSS grew {growth / 1e6:.0f} MB"


# -- property tests: arbitrary input never raises -----------------------------

chunks = st.lists(st.binary(max_size=300), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
usage_keys = st.sampled_from(["usage", "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                              "total_tokens", "prompt_tokens_details", "input_tokens_details", "cached_tokens",
                              "reasoning_tokens", "type", "seconds", "response", "error", "model", "id", "status"])
usage_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.dictionaries(usage_keys, children, max_size=6) | st.lists(children, max_size=3),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(chunks, st.integers(min_value=1, max_value=2000))
def test_sse_parser_survives_any_bytes(parts, cap):
    parser = SSEParser(max_buffer=cap)
    for part in parts:
        try:
            for event in parser.feed(part):
                assert isinstance(event.data, str)
        except SSEOverflow:
            assert len(parser.drain()) > cap
            break
    parser.close()


@settings(max_examples=300, deadline=None)
@given(chunks, st.booleans(), st.sampled_from([None, "gzip", "identity", "br", "x-bogus"]))
def test_stream_tap_forwards_every_byte(parts, strip, encoding):
    """Whatever arrives, the client gets exactly those bytes (nothing lost, nothing added)."""
    tap = StreamTap(strip, encoding, max_buffer=512)
    out = []
    for part in [*parts, b""]:
        result = tap(part)
        out.extend(result if isinstance(result, list) else [result])
    sent = b"".join(parts)
    got = b"".join(out)
    if not strip or (tap.meter.usage is None and b'"usage":null' not in sent):
        assert got == sent
    else:  # only the usage-only chunk the proxy asked for, and "usage":null keys, may be cut out:
        assert _is_subsequence(got, sent)  # bytes removed, none added or reordered (exact: the test below)


def _is_subsequence(small: bytes, big: bytes) -> bool:
    it = iter(big)
    return all(byte in it for byte in small)


def _chunk(delta: str | None, usage: dict | None, include_null: bool) -> bytes:
    body: dict = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                  "choices": [] if delta is None else [{"index": 0, "delta": {"content": delta}}]}
    if usage is not None:
        body["usage"] = usage
    elif include_null:
        body["usage"] = None
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=8), st.booleans(), st.booleans(),
       st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_stream_tap_strips_exactly_what_the_proxy_added(deltas, null_keys, comment, cuts):
    """With include_usage injected, the client gets upstream's stream as if it had not been asked for:
    every content chunk without its "usage":null, no usage-only chunk, everything else byte for byte."""
    usage = {"prompt_tokens": 9, "completion_tokens": len(deltas), "total_tokens": 9 + len(deltas)}
    events = [(_chunk(d, None, include_null=null_keys), _chunk(d, None, include_null=False)) for d in deltas]
    if comment:
        events.insert(len(events) // 2, (b": keep-alive\n\n", b": keep-alive\n\n"))
    events.append((_chunk(None, usage, include_null=False), b""))  # the usage-only chunk: the proxy's own
    events.append((b"data: [DONE]\n\n", b"data: [DONE]\n\n"))
    sent = b"".join(raw for raw, _ in events)
    expected = b"".join(out for _, out in events)
    points = sorted({c % (len(sent) + 1) for c in cuts})
    parts = [sent[a:b] for a, b in zip([0, *points], [*points, len(sent)], strict=True)]
    tap = StreamTap(True, None, max_buffer=1 << 20)
    out = []
    for part in [*parts, b""]:
        result = tap(part)
        out.extend(result if isinstance(result, list) else [result])
    assert b"".join(out) == expected
    assert tap.meter.usage is not None and tap.meter.usage.total_tokens == usage["total_tokens"]


@settings(max_examples=500, deadline=None)
@given(usage_like | json_values)
def test_usage_extraction_survives_any_json(obj):
    usage = wire.parse_usage(obj)
    if usage is not None:
        assert usage.total_tokens == (usage.input_tokens or 0) + (usage.output_tokens or 0) or usage.seconds
    wire.facts_from_body(obj)
    wire.facts_from_body({"response": obj, "usage": obj, "error": obj})
    wire.facts_from_request(obj, 10)
    stream = wire.StreamMeter(strip_usage_chunk=True)
    for kind in (None, "response.completed", "error"):
        data = json.dumps(obj, default=str)
        stream.observe(SSEEvent(event=kind, data=data, raw=b""))
