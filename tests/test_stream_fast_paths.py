"""The stream tap's fast paths (README, Benchmarks) decide exactly as the general code does."""

from __future__ import annotations

import pytest

from addon.metering import wire
from addon.metering.stream_tap import StreamTap, _without_null_usage


@pytest.mark.parametrize("data", [
    '{"choices":[],"usage":null}',
    '{"choices":[],"usage":{"prompt_tokens":1}}',
    '{"usage" : {"prompt_tokens":1}}',
    '{"usage":\n{"total_tokens":3}}',
    '{"usage":null,"x":{"usage":{"total_tokens":3}}}',
    '{"usage":nullx}',
    '{"content":"say \\"usage\\":null please","usage":null}',
    '{"usage":"none"}',
    '{"usage":null,"usage":null}',
    '',
])
def test_the_usage_object_check_agrees_with_the_pattern(data):
    assert wire._usage_object_in(data) == (wire._USAGE_OBJECT.search(data) is not None)


@pytest.mark.parametrize(("raw", "expected"), [
    (b'data: {"a":1,"usage":null}\n\n', b'data: {"a":1}\n\n'),
    (b'data: {"usage":null,"a":1}\n\n', b'data: {"a":1}\n\n'),
    (b'data: {"usage":null}\n\n', b'data: {"usage":null}\n\n'),  # nothing else: left as it is
    (b'data: {"a":1}\n\n', b'data: {"a":1}\n\n'),
])
def test_null_usage_is_cut_once(raw, expected):
    assert _without_null_usage(raw) == expected


def test_one_event_per_chunk_and_several_per_chunk_forward_the_same_bytes():
    events = [b'data: {"id":"c1","model":"m","choices":[{"delta":{"content":"a"}}],"usage":null}\n\n',
              b'data: {"id":"c1","choices":[{"delta":{"content":"b"}}],"usage":null}\n\n',
              b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}\n\n',
              b"data: [DONE]\n\n"]
    one_by_one = StreamTap(True, None, 1 << 20)
    sent = b"".join(b"".join(one_by_one(e)) for e in events) + b"".join(one_by_one(b""))
    together = StreamTap(True, None, 1 << 20)
    sent_together = b"".join(together(b"".join(events))) + b"".join(together(b""))
    assert sent == sent_together == (b'data: {"id":"c1","model":"m","choices":[{"delta":{"content":"a"}}]}\n\n'
                                     b'data: {"id":"c1","choices":[{"delta":{"content":"b"}}]}\n\n'
                                     b"data: [DONE]\n\n")
    assert one_by_one.meter.usage is not None and one_by_one.meter.usage.total_tokens == 5
    assert all(piece for piece in one_by_one(b'data: {"choices":[]}\n\n'))  # never an empty piece
