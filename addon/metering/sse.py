"""Incremental Server-Sent Events parsing that never needs the whole stream.

The parser is fed whatever bytes the network delivers (frames split mid-line,
mid-UTF-8 character, CRLF or CR line endings, comments, keep-alives) and
returns complete events together with the exact raw bytes they came from, so a
caller can drop an event from the stream without re-encoding anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# One line terminator, then another: the end of an event ("blank line").
# A CR directly followed by LF is one terminator (CRLF), never two.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_LINE = re.compile(r"\r\n|\r|\n")

DEFAULT_MAX_BUFFER = 16 * 1024 * 1024


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. `data` is the joined `data:` lines, decoded."""

    event: str | None
    data: str
    raw: bytes
    id: str | None = None
    comment: bool = False  # a block with no fields (keep-alive, ": ping")


class SSEOverflow(Exception):
    """An event grew past the buffer cap; the caller should stop parsing."""


class SSEParser:
    """Feed bytes, get events. Memory is bounded by `max_buffer`.

    Only the current incomplete event is held. When it grows past
    `max_buffer`, `feed` raises `SSEOverflow`; the held bytes can then be
    taken with `drain()` and the parser accepts no more input.
    """

    __slots__ = ("_buffer", "max_buffer", "overflowed")

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self._buffer = bytearray()
        self.max_buffer = max_buffer
        self.overflowed = False

    @property
    def pending(self) -> bytes:
        """Raw bytes of the incomplete event at the end of the input so far."""
        return bytes(self._buffer)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self.overflowed:
            raise SSEOverflow("parser stopped after overflow")
        buffer = self._buffer
        # Fast path: the chunk is exactly one LF-terminated event (how OpenAI's
        # frames usually arrive).
        if not buffer and chunk.find(b"\n\n") == len(chunk) - 2 >= 0 and b"\r" not in chunk:
            return [parse_event(chunk)]
        # Only rescan the tail that could complete a terminator.
        scan_from = max(len(buffer) - 3, 0)
        buffer += chunk
        events: list[SSEEvent] = []
        start = 0
        pos = scan_from
        while True:
            match = _EVENT_END.search(buffer, pos)
            if match is None:
                break
            end = match.end()
            # A lone trailing CR may be the first half of CRLF: wait for more.
            if end == len(buffer) and buffer[end - 1] == 0x0D:
                break
            raw = bytes(buffer[start:end])
            events.append(parse_event(raw))
            start = pos = end
        if start:
            del buffer[:start]
        if len(buffer) > self.max_buffer:
            self.overflowed = True
            raise SSEOverflow(f"SSE event larger than {self.max_buffer} bytes")
        return events

    def drain(self) -> bytes:
        """Take the held bytes of the incomplete event (used after overflow)."""
        held = bytes(self._buffer)
        self._buffer.clear()
        return held

    def close(self) -> list[SSEEvent]:
        """End of stream: dispatch what is left, as a lenient client would."""
        if self.overflowed or not self._buffer:
            self._buffer.clear()
            return []
        raw = bytes(self._buffer)
        self._buffer.clear()
        return [parse_event(raw)]


def parse_event(raw: bytes) -> SSEEvent:
    """Parse one event's raw bytes (comment-only blocks have `comment` set)."""
    # Fast paths for what OpenAI sends: "data: X\n\n" (Chat Completions) and
    # "event: E\ndata: X\n\n" (Responses). Anything else takes the general path.
    if raw.endswith(b"\n\n") and b"\r" not in raw:
        lines = raw.count(b"\n")
        if lines == 2 and raw.startswith(b"data: "):
            return SSEEvent(event=None, data=raw[6:-2].decode("utf-8", errors="replace"), raw=raw)
        if lines == 3 and raw.startswith(b"event: "):
            split = raw.index(b"\n") + 1
            if raw.startswith(b"data: ", split):
                name = raw[7 : split - 1].decode("utf-8", errors="replace")
                data = raw[split + 6 : -2].decode("utf-8", errors="replace")
                return SSEEvent(event=name, data=data, raw=raw)
    text = raw.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    data_lines: list[str] = []
    event_name: str | None = None
    event_id: str | None = None
    for line in _LINE.split(text):
        if not line or line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data_lines.append(value)
        elif field == "event":
            event_name = value
        elif field == "id":
            event_id = value
    if not data_lines and event_name is None:
        return SSEEvent(event=None, data="", raw=raw, id=event_id, comment=True)
    return SSEEvent(event=event_name, data="\n".join(data_lines), raw=raw, id=event_id)
