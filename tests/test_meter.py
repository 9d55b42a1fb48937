"""Usage extraction per endpoint, request facts, credentials, and the stream tap.

The payloads are the real wire formats (shared/openai-wire-formats.md); every
nested field is optional, so partial and odd shapes are tested too.
"""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.metering import wire
from addon.metering.sse import SSEParser
from addon.metering.stream_tap import StreamTap

# ---------------------------------------------------------------------------
# Endpoints


@pytest.mark.parametrize(
    "method, path, name, deployment, rid",
    [
        ("POST", "/v1/chat/completions", "chat.completions", None, None),
        ("POST", "/v1/chat/completions?x=1", "chat.completions", None, None),
        ("POST", "/v1/completions", "completions", None, None),
        ("POST", "/v1/responses", "responses", None, None),
        ("GET", "/v1/responses/resp_abc123", "responses.get", None, "resp_abc123"),
        ("DELETE", "/v1/responses/resp_abc123", "responses.delete", None, "resp_abc123"),
        ("POST", "/v1/responses/resp_abc123/cancel", "responses.cancel", None, "resp_abc123"),
        ("GET", "/v1/responses/resp_abc123/input_items", "responses.input_items", None, "resp_abc123"),
        ("POST", "/v1/embeddings", "embeddings", None, None),
        ("POST", "/v1/audio/transcriptions", "audio.transcriptions", None, None),
        ("POST", "/v1/images/generations", "images.generations", None, None),
        ("GET", "/v1/files/file-abc12345678/content", "files.content", None, None),
        ("POST", "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21", "chat.completions",
         "my-gpt4o", None),
        ("POST", "/openai/v1/responses", "responses", None, None),
        ("GET", "/", "root", None, None),
    ],
)
def test_classify(method, path, name, deployment, rid):
    endpoint = wire.classify(method, path)
    assert (endpoint.name, endpoint.deployment, endpoint.response_id) == (name, deployment, rid)


# ---------------------------------------------------------------------------
# Usage objects


def cols(usage):
    return None if usage is None else (usage.input_tokens, usage.cached_tokens, usage.output_tokens,
                                       usage.reasoning_tokens, usage.total_tokens)


def test_chat_usage_with_details():
    usage = wire.parse_usage({
        "prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
        "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 30, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    })
    assert cols(usage) == (100, 64, 40, 30, 140)


def test_chat_usage_without_details_and_with_null_details():
    assert cols(wire.parse_usage({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})) == (5, 0, 2, 0, 7)
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None,
             "completion_tokens_details": None}
    assert cols(wire.parse_usage(usage)) == (5, 0, 2, 0, 7)


def test_total_is_input_plus_output_even_if_upstream_says_otherwise():
    usage = wire.parse_usage({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 999})
    assert usage.total_tokens == 7


def test_responses_usage():
    usage = wire.parse_usage({"input_tokens": 300, "input_tokens_details": {"cached_tokens": 128},
                               "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 20},
                               "total_tokens": 350})
    assert cols(usage) == (300, 128, 50, 20, 350)


def test_embeddings_usage_has_no_output():
    assert cols(wire.parse_usage({"prompt_tokens": 8, "total_tokens": 8})) == (8, 0, 0, 0, 8)


def test_transcription_token_usage():
    usage = wire.parse_usage({"type": "tokens", "input_tokens": 70,
                               "input_token_details": {"text_tokens": 0, "audio_tokens": 70},
                               "output_tokens": 12, "total_tokens": 82})
    assert cols(usage) == (70, 0, 12, 0, 82)
    assert usage.seconds is None


def test_transcription_duration_usage():
    usage = wire.parse_usage({"type": "duration", "seconds": 7})
    # Duration-billed: no tokens at all (NULL columns, not 0).
    assert usage.seconds == 7.0 and usage.total_tokens is None and usage.input_tokens is None
    assert usage.as_columns()["audio_seconds"] == 7.0
    assert wire.implausible_usage(wire.parse_usage({"type": "duration", "seconds": "7"})) is not None


def test_image_usage():
    usage = wire.parse_usage({"input_tokens": 30, "input_tokens_details": {"text_tokens": 30, "image_tokens": 0},
                               "output_tokens": 4160, "total_tokens": 4190})
    assert cols(usage) == (30, 0, 4160, 0, 4190)


@pytest.mark.parametrize("value", [None, [], "x", 3, {}, {"foo": 1}, {"prompt_tokens": None},
                                   {"prompt_tokens": "12", "completion_tokens": True}])
def test_not_usage(value):
    usage = wire.parse_usage(value)
    assert usage is None or wire.implausible_usage(usage) is not None  # no usage, or usage recorded as none


def test_odd_numbers():
    usage = wire.parse_usage({"prompt_tokens": 10.0, "completion_tokens": 0})
    assert cols(usage) == (10, 0, 0, 0, 10) and wire.implausible_usage(usage) is None  # 10.0 is a whole number
    assert "bool" in wire.implausible_usage(wire.parse_usage({"prompt_tokens": 10, "completion_tokens": True}))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"prompt_tokens": -1000000, "completion_tokens": 5}, "negative"),
        ({"prompt_tokens": 1e20, "completion_tokens": 5}, "implausibly large"),
        ({"prompt_tokens": 2**70, "completion_tokens": 5}, "implausibly large"),
        ({"prompt_tokens": 1.5, "completion_tokens": 5}, "not an integer"),
        ({"prompt_tokens": "12", "completion_tokens": 5}, "not a number"),
        ({"prompt_tokens": 5, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": -3}}, "negative"),
        ({"prompt_tokens": 5, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}}, "exceeds"),
        ({"input_tokens": 5, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": "x"}}, "not a number"),
        ({"type": "duration", "seconds": -4}, "negative"),
    ],
)
def test_implausible_usage(raw, reason):
    assert reason in wire.implausible_usage(wire.parse_usage(raw))


def test_implausible_usage_checks_every_numeric_field():
    """Fields added to Usage later (audio, images, ...) are covered without a change here."""
    from dataclasses import fields

    for item in fields(wire.Usage):
        if "int" not in str(item.type) and "float" not in str(item.type):
            continue
        usage = wire.Usage(input_tokens=10, output_tokens=10, total_tokens=20)
        setattr(usage, item.name, -1)
        assert item.name in wire.implausible_usage(usage)
    assert wire.implausible_usage(wire.Usage(input_tokens=10, output_tokens=10, total_tokens=20)) is None


# ---------------------------------------------------------------------------
# Whole bodies


def test_chat_body_facts():
    facts = wire.facts_from_body({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                                   "service_tier": "default", "choices": [],
                                   "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    assert (facts.model, facts.response_id, facts.service_tier, facts.error) == (
        "gpt-4o-2024-08-06", "chatcmpl-1", "default", None)
    assert cols(facts.usage) == (3, 0, 4, 0, 7)


def test_background_response_facts():
    queued = wire.facts_from_body({"id": "resp_1", "object": "response", "status": "queued", "usage": None,
                                    "model": "gpt-5"})
    assert (queued.status, queued.usage, queued.response_id) == ("queued", None, "resp_1")
    failed = wire.facts_from_body({"id": "resp_1", "status": "failed", "error": {"code": "server_error",
                                                                                  "message": "boom"}})
    assert failed.error == "server_error: boom"
    failed = wire.facts_from_body({"id": "resp_1", "status": "failed", "error": None})
    assert failed.error == "response failed"


def test_error_body_facts():
    facts = wire.facts_from_body({"error": {"message": "Rate limit", "type": "requests",
                                             "param": None, "code": "rate_limit_exceeded"}})
    assert facts.error == "requests/rate_limit_exceeded: Rate limit"
    assert wire.facts_from_body({"error": "plain"}).error == "plain"
    assert wire.facts_from_body([1, 2]).usage is None


def test_parse_json_rejects_garbage_quietly():
    assert wire.parse_json(b"<html>") is None
    assert wire.parse_json(b"\xff\xfe") is None
    assert wire.parse_json(b"[" * 100_000) is None


# ---------------------------------------------------------------------------
# Requests


def test_request_facts():
    facts = wire.facts_from_request({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": False},
                                      "max_completion_tokens": 50, "service_tier": "flex"}, 123)
    assert (facts.model, facts.stream, facts.include_usage, facts.max_output_tokens, facts.service_tier,
            facts.input_chars, facts.json_ok) == ("gpt-4o", True, False, 50, "flex", 123, True)
    facts = wire.facts_from_request({"model": 5, "stream": "yes", "background": True, "max_output_tokens": -1})
    assert (facts.model, facts.stream, facts.background, facts.max_output_tokens) == (None, False, True, None)
    assert not wire.facts_from_request(["x"]).json_ok


def test_include_usage_is_added_in_front_leaving_the_client_bytes_alone():
    body = b'  {"model": "gpt-4o",\n "stream": true, "messages": [{"role": "user", "content": "h\xc3\xa9 \\u00e9"}]}'
    out = wire.with_include_usage(body, json.loads(body))
    assert out == b'  {"stream_options":{"include_usage":true},"model": "gpt-4o",\n "stream": true, ' \
                  b'"messages": [{"role": "user", "content": "h\xc3\xa9 \\u00e9"}]}'


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"include_usage": False}, {"include_usage": True}),
        ({"include_obfuscation": False}, {"include_obfuscation": False, "include_usage": True}),
        (None, {"include_usage": True}),
        ("junk", {"include_usage": True}),
    ],
)
def test_include_usage_is_merged_into_existing_stream_options(options, expected):
    obj = {"model": "gpt-4o", "stream": True, "stream_options": options}
    out = json.loads(wire.with_include_usage(json.dumps(obj).encode(), obj))
    assert out == {**obj, "stream_options": expected}
    assert obj["stream_options"] == options  # the parsed request is not changed


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16-le", "utf-16-be", "utf-16", "utf-32-le", "utf-32"])
def test_include_usage_in_other_encodings_is_written_anew(encoding):
    # json.loads reads all of these; only plain UTF-8 takes ASCII inserted as is.
    obj = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Grüße"}]}
    body = json.dumps(obj, ensure_ascii=False).encode(encoding)
    out = wire.with_include_usage(body, json.loads(body))
    assert json.loads(out) == {**obj, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("lone_surrogate", [b"\\ud800", b"\xed\xa0\x80"])
@pytest.mark.parametrize("options", [b"", b'"stream_options": {"include_usage": false}, '])
def test_include_usage_with_a_lone_surrogate(lone_surrogate, options):
    # Valid for json.loads, not encodable as UTF-8: the body must still go out.
    body = b'{' + options + b'"model": "gpt-4o", "stream": true, "messages": [{"content": "a' + lone_surrogate + b'"}]}'
    obj = json.loads(body)
    out = wire.with_include_usage(body, obj)
    assert json.loads(out) == {**obj, "stream_options": {"include_usage": True}}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@given(
    obj=st.dictionaries(st.text(max_size=8) | st.just("stream_options"), json_values, max_size=5),
    indent=st.sampled_from([None, 0, 2]),
    ascii_only=st.booleans(),
    lead=st.sampled_from(["", " ", "\n\t "]),
)
def test_include_usage_property(obj, indent, ascii_only, lead):
    body = (lead + json.dumps(obj, indent=indent, ensure_ascii=ascii_only)).encode()
    out = wire.with_include_usage(body, json.loads(body))
    options = obj.get("stream_options")
    expected = {**obj, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
    assert json.loads(out) == expected
    if "stream_options" not in obj:
        assert body[len(lead) + 1 :] in out  # the client's own bytes, untouched


# ---------------------------------------------------------------------------
# Credentials


class Headers(dict):
    def get(self, name, default=None):
        return super().get(name.lower(), default)


def test_credentials():
    assert wire.credential(Headers({"authorization": "Bearer sk-abc"})) == "sk-abc"
    assert wire.credential(Headers({"authorization": "bearer  sk-abc "})) == "sk-abc"
    assert wire.credential(Headers({"api-key": "azurekey"})) == "azurekey"
    assert wire.credential(Headers({"authorization": "Basic xyz"})) is None
    assert wire.credential(Headers({})) is None


def test_key_id_and_hint_never_reveal_the_key():
    key = "sk-proj-test0123456789abcdefWXYZ"
    kid = wire.key_id(key)
    assert len(kid) == 12 and int(kid, 16) >= 0 and kid == wire.key_id(key) and kid != wire.key_id(key + "x")
    assert wire.key_hint(key) == "sk-…WXYZ"
    assert wire.key_hint("0123456789abcdef") == "…cdef"
    assert wire.key_hint("short") == "…"


# ---------------------------------------------------------------------------
# Streams


def frame(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


CHAT_USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
              "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 1}}


def chat_stream(include_usage: bool, azure_first: bool = False) -> tuple[list[bytes], bytes | None]:
    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18",
            "service_tier": "default"}
    if include_usage:
        base["usage"] = None
    frames = []
    if azure_first:
        frames.append(frame({**base, "choices": [], "prompt_filter_results": []}))
    frames += [frame({**base, "choices": [{"index": 0, "delta": {"content": f"é{i}😀"}}], "obfuscation": "x"})
               for i in range(3)]
    frames.append(frame({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage_frame = frame({**base, "choices": [], "usage": CHAT_USAGE}) if include_usage else None
    if usage_frame:
        frames.append(usage_frame)
    frames.append(b"data: [DONE]\n\n")
    return frames, usage_frame


def run_stream(tap: StreamTap, stream: bytes, cuts: list[int]) -> bytes:
    out = []
    previous = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        if cut == previous:
            continue
        result = tap(stream[previous:cut])
        out.append(result if isinstance(result, bytes) else b"".join(result))
        previous = cut
    final = tap(b"")
    out.append(final if isinstance(final, bytes) else b"".join(final))
    return b"".join(out)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.booleans(), st.sampled_from(["\n", "\r\n"]))
def test_stripping_removes_exactly_the_injected_usage_chunk(data, azure_first, newline):
    frames, usage_frame = chat_stream(include_usage=True, azure_first=azure_first)
    frames = [f.replace(b"\n", newline.encode()) for f in frames]
    usage_frame = usage_frame.replace(b"\n", newline.encode())
    stream = b"".join(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=15))
    tap = StreamTap(strip=True, content_encoding=None, max_buffer=1 << 20)
    seen = run_stream(tap, stream, cuts)
    # Exactly the stream a client that did not ask gets from upstream: no usage chunk, no "usage":null.
    plain, _ = chat_stream(include_usage=False, azure_first=azure_first)
    assert seen == b"".join(f.replace(b"\n", newline.encode()) for f in plain)
    assert cols(tap.meter.usage) == (11, 2, 3, 1, 14)
    assert tap.meter.model == "gpt-4o-mini-2024-07-18" and tap.meter.done and tap.broken is None


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_client_that_asked_for_usage_gets_the_chunk(data):
    frames, _ = chat_stream(include_usage=True)
    stream = b"".join(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    tap = StreamTap(strip=False, content_encoding=None, max_buffer=1 << 20)
    assert run_stream(tap, stream, cuts) == stream
    assert cols(tap.meter.usage) == (11, 2, 3, 1, 14)


COMPRESSORS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(sorted(COMPRESSORS)))
def test_compressed_streams_are_read_and_forwarded_untouched(data, encoding):
    frames, _ = chat_stream(include_usage=True)
    encoded = COMPRESSORS[encoding](b"".join(frames))
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=10))
    # strip is asked for but impossible on a compressed stream: must not cut.
    tap = StreamTap(strip=True, content_encoding=encoding, max_buffer=1 << 20)
    assert run_stream(tap, encoded, cuts) == encoded
    assert cols(tap.meter.usage) == (11, 2, 3, 1, 14)


def test_unknown_encoding_is_forwarded_and_reported():
    tap = StreamTap(strip=False, content_encoding="snappy", max_buffer=1 << 20)
    assert tap(b"\x00\x01") == b"\x00\x01"
    assert "snappy" in tap.broken and tap.meter.usage is None


def test_overflowing_event_is_forwarded_whole_and_metering_stops():
    tap = StreamTap(strip=True, content_encoding=None, max_buffer=1000)
    first = frame({"choices": [{"index": 0, "delta": {"content": "hi"}}], "model": "m"})
    big = b"data: " + b"x" * 3000
    out = run_stream(tap, first + big + b"\n\n" + b"data: [DONE]\n\n", [len(first) + 500, len(first) + 2000])
    assert out == first + big + b"\n\n" + b"data: [DONE]\n\n"
    assert tap.broken and "1000" in tap.broken


def responses_stream(terminal: str = "response.completed") -> bytes:
    seq = iter(range(100))

    def event(kind, payload):
        body = {"type": kind, "sequence_number": next(seq), **payload}
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()

    response = {"id": "resp_7", "object": "response", "model": "gpt-5-2025-08-07", "status": "in_progress",
                "usage": None, "service_tier": "auto"}
    status = terminal.split(".")[1]
    usage = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 9,
             "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 49}
    final = {**response, "status": status, "usage": usage, "service_tier": "default"}
    if status == "failed":
        final["error"] = {"code": "server_error", "message": "model crashed"}
    return (event("response.created", {"response": response})
            + event("response.in_progress", {"response": response})
            + b"".join(event("response.output_text.delta", {"delta": f"w{i} \"usage\""}) for i in range(3))
            + b": keep-alive\n\n"
            + event(terminal, {"response": final}))


@pytest.mark.parametrize("terminal", ["response.completed", "response.incomplete", "response.failed"])
def test_responses_stream_usage_from_terminal_event(terminal):
    tap = StreamTap(strip=False, content_encoding=None, max_buffer=1 << 20)
    stream = responses_stream(terminal)
    assert run_stream(tap, stream, list(range(0, len(stream), 7))) == stream
    facts = tap.meter
    assert cols(facts.usage) == (40, 8, 9, 4, 49)
    assert (facts.model, facts.response_id, facts.status, facts.service_tier, facts.done) == (
        "gpt-5-2025-08-07", "resp_7", terminal.split(".")[1], "default", True)
    assert (facts.error is not None) == (terminal == "response.failed")


def test_stream_error_events():
    stream = wire.StreamMeter()
    for event in SSEParser().feed(frame({"choices": [{"delta": {"content": "a"}}], "model": "gpt-4o"})
                                  + frame({"error": {"message": "The server had an error", "type": "server_error"}})):
        stream.observe(event)
    assert stream.error == "server_error: The server had an error" and stream.usage is None
    stream = wire.StreamMeter()
    for event in SSEParser().feed(b'event: error\ndata: {"type":"error","code":"server_error","message":"boom"}\n\n'):
        stream.observe(event)
    assert stream.error and "boom" in stream.error


def test_streamed_transcription_usage():
    stream = wire.StreamMeter()
    events = SSEParser().feed(
        b'data: {"type":"transcript.text.delta","delta":"hel"}\n\n'
        b'data: {"type":"transcript.text.done","text":"hello","usage":{"type":"tokens","input_tokens":14,'
        b'"input_token_details":{"text_tokens":0,"audio_tokens":14},"output_tokens":3,"total_tokens":17}}\n\n')
    for event in events:
        assert stream.observe(event)
    assert cols(stream.usage) == (14, 0, 3, 0, 17) and stream.done


def test_stream_without_usage_has_none():
    frames, _ = chat_stream(include_usage=False)
    tap = StreamTap(strip=True, content_encoding=None, max_buffer=1 << 20)
    stream = b"".join(frames)
    assert run_stream(tap, stream, [5, 50]) == stream
    assert tap.meter.usage is None and tap.meter.done


def test_strip_mode_never_hands_mitmproxy_an_empty_chunk():
    # An empty piece would go out as HTTP/1's last chunk and end the body early.
    tap = StreamTap(strip=True, content_encoding=None, max_buffer=1 << 20)
    frames, _ = chat_stream(include_usage=True)
    stream = b"".join(frames)
    pieces = [tap(stream[i : i + 3]) for i in range(0, len(stream), 3)] + [tap(b"")]
    assert all(isinstance(p, list) and len(p) <= 1 and all(p) for p in pieces)
    # Several events in one network chunk go out as one write.
    tap = StreamTap(strip=True, content_encoding=None, max_buffer=1 << 20)
    plain, _ = chat_stream(include_usage=False)
    assert tap(b"".join(frames[:3])) == [b"".join(plain[:3])]


def test_fast_paths_agree_with_the_general_parser():
    from addon.metering.sse import parse_event

    for raw in [b'data: {"a":"\xc3\xa9"}\n\n', b"event: response.completed\ndata: {}\n\n", b"event: x\ndata:y\n\n",
                b"event:  x\ndata:  y\n\n", b"data: a\ndata: b\n\n", b"\ndata: y\n\n"]:
        fast = parse_event(raw)
        general = parse_event(raw.replace(b"\n", b"\r\n"))
        assert (fast.event, fast.data, fast.comment) == (general.event, general.data, general.comment), raw
