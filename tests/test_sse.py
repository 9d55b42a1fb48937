"""The incremental SSE parser, fed the same stream split at every possible place.

A small, obviously correct reference parser (the WHATWG event-stream rules,
whole stream at once) is the oracle; the real parser must agree with it for
any split of the bytes, and the raw bytes it hands back must add up to the
input exactly (the addon forwards `event.raw`, so a lost or doubled byte
would corrupt what the client sees).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.metering.sse import SSEOverflow, SSEParser, parse_event

TERMINATORS = ["\n", "\r\n", "\r"]


def reference(stream: bytes) -> list[tuple[str | None, str, bool]]:
    """(event, data, comment) per block, by the spec's line rules, in one go.

    Like the real parser, a trailing block without its blank line is
    dispatched at the end (lenient, as clients do at end of stream).
    """
    text = stream.decode("utf-8", errors="replace")
    lines = re.split(r"\r\n|\r|\n", text)
    ended_blank = bool(re.search(r"(\r\n|\r|\n)$", text))
    if ended_blank:
        lines.pop()  # split leaves an empty string after the last terminator
    events: list[tuple[str | None, str, bool]] = []
    block: list[str] = []

    def dispatch() -> None:
        data, name, fields = [], None, False
        for line in block:
            if line.startswith(":"):
                continue
            field, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if field == "data":
                data.append(value)
                fields = True
            elif field == "event":
                name = value
                fields = True
        events.append((name, "\n".join(data), not fields))

    for line in lines:
        if line == "":
            if block:
                dispatch()
            block = []
        else:
            block.append(line)
    if block:
        dispatch()
    return events


def feed_split(stream: bytes, cuts: list[int], parser: SSEParser | None = None):
    parser = parser or SSEParser()
    events = []
    previous = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        events += parser.feed(stream[previous:cut])
        previous = cut
    events += parser.close()
    return events


def summary(events) -> list[tuple[str | None, str, bool]]:
    return [(e.event, e.data, e.comment) for e in events]


# Text without line breaks, including multi-byte UTF-8 (2, 3 and 4 bytes).
line_text = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
        st.sampled_from(["é", "€", "中", "😀", "\u2028", "{", "}", '"', ":", " "]),
    ),
    max_size=30,
)


@st.composite
def event_blocks(draw) -> tuple[bytes, list[tuple[str | None, str, bool]]]:
    """A stream of events with mixed terminators, comments and keep-alives.

    Returns the bytes and what a client must see. A line ending in CR is never
    followed by a blank line ending in LF: that pair is one CRLF, not a blank
    line, so such a stream would mean something else.
    """
    out: list[str] = []
    expected: list[tuple[str | None, str, bool]] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["data", "event", "comment", "keepalive"]))
        lines: list[str] = []
        name = None
        data: list[str] = []
        if kind == "keepalive":
            lines = [":"]
        elif kind == "comment":
            lines = [": " + draw(line_text)]
        else:
            if kind == "event":
                name = draw(st.sampled_from(["response.completed", "response.output_text.delta", "error", "x"]))
                lines.append(f"event: {name}")
            for _ in range(draw(st.integers(1, 3))):
                value = draw(line_text)
                data.append(value)
                # "data:x" and "data: x" mean the same; "data:  x" keeps one space.
                spaced = draw(st.booleans()) or value.startswith(" ")
                lines.append(f"data: {value}" if spaced else f"data:{value}")
            if draw(st.booleans()):
                lines.insert(draw(st.integers(0, len(lines))), ": interleaved comment")
            if draw(st.booleans()):
                lines.append("id: 42")
        terminators = [draw(st.sampled_from(TERMINATORS)) for _ in lines]
        blank = draw(st.sampled_from(TERMINATORS))
        if terminators[-1] == "\r" and blank == "\n":
            blank = "\r\n"
        out.append("".join(line + end for line, end in zip(lines, terminators, strict=True)) + blank)
        comment = kind in ("comment", "keepalive")
        expected.append((name, "\n".join(data), comment))
    return "".join(out).encode("utf-8"), expected


@st.composite
def stream_and_cuts(draw):
    stream, expected = draw(event_blocks())
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12)) if stream else []
    return stream, expected, cuts


@settings(max_examples=400, deadline=None)
@given(stream_and_cuts())
def test_any_split_gives_the_events_of_the_whole_stream(case):
    stream, expected, cuts = case
    events = feed_split(stream, cuts)
    assert summary(events) == expected
    assert summary(events) == reference(stream)
    # Lossless: the raw bytes of the events are the stream, in order.
    assert b"".join(e.raw for e in events) == stream


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=10))
def test_arbitrary_bytes_never_crash_and_stay_lossless(stream, cuts):
    cuts = [c for c in cuts if c <= len(stream)]
    events = feed_split(stream, cuts)
    assert b"".join(e.raw for e in events) == stream
    assert summary(events) == summary(feed_split(stream, []))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.integers(1, 5))
def test_byte_by_byte_feeding_of_multibyte_utf8(text, repeat):
    text = text.replace("\r", " ").replace("\n", " ")
    stream = "".join(f"data: {text}{i}😀\r\n\r\n" for i in range(repeat)).encode()
    events = feed_split(stream, list(range(len(stream))))
    assert [e.data for e in events] == [f"{text}{i}😀" for i in range(repeat)]


def test_crlf_event_and_data_stay_one_event():
    # Regression: a lone CRLF used to be taken for a blank line, splitting
    # `event:` from its `data:` in CRLF streams.
    parser = SSEParser()
    events = parser.feed(b'event: response.completed\r\ndata: {"a":1}\r\ndata: 2\r\n\r\n')
    assert summary(events) == [("response.completed", '{"a":1}\n2', False)]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: x\r", b"\n\r", b"\n"],  # CRLF CRLF cut after each CR
        [b"data: x\r\n\r", b"\n"],
        [b"data: x\n", b"\r", b"\ndata: y\n\n"],
    ],
)
def test_trailing_cr_waits_for_a_possible_lf(chunks):
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    joined = b"".join(chunks)
    assert summary(events) == reference(joined)
    assert b"".join(e.raw for e in events) == joined


def test_cr_only_lines():
    events = feed_split(b"event: a\rdata: 1\r\rdata: 2\r\r", [3, 9, 14])
    assert summary(events) == [("a", "1", False), (None, "2", False)]


def test_comments_and_keepalives_are_comment_events():
    events = feed_split(b": keep-alive\n\n:\n\ndata: [DONE]\n\n", [])
    assert [(e.comment, e.data) for e in events] == [(True, ""), (True, ""), (False, "[DONE]")]


def test_events_are_returned_as_soon_as_their_blank_line_arrives():
    parser = SSEParser()
    assert parser.feed(b"data: one\n") == []
    assert parser.pending == b"data: one\n"
    assert [e.data for e in parser.feed(b"\ndata: tw")] == ["one"]
    assert parser.pending == b"data: tw"


def test_unterminated_last_event_is_dispatched_at_close():
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: b") and parser.close()[0].data == "b"
    assert parser.close() == []


def test_overflow_raises_and_drain_returns_the_held_bytes():
    parser = SSEParser(max_buffer=100)
    assert parser.feed(b"data: " + b"x" * 50) == []
    with pytest.raises(SSEOverflow):
        parser.feed(b"y" * 60)
    assert parser.drain() == b"data: " + b"x" * 50 + b"y" * 60
    with pytest.raises(SSEOverflow):
        parser.feed(b"\n\n")
    assert parser.close() == []


def test_field_rules():
    event = parse_event(b"\xef\xbb\xbfdata\ndata:no-space\nevent:name\nid: 7\nretry: 10\nunknown: z\n\n")
    assert (event.event, event.data, event.id, event.comment) == ("name", "\nno-space", "7", False)
    assert parse_event(b"data:  two spaces\n\n").data == " two spaces"
    assert parse_event(b"id: 1\n\n").comment
