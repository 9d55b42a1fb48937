"""The tap on a streamed (SSE) response: forwards bytes, reads usage on the way.

Pure: the proxy's meter sets a StreamTap as `flow.response.stream`; nothing here knows mitmproxy.
"""

from __future__ import annotations

import logging
import time

from addon.metering import wire
from addon.metering.decoding import decoder_for
from addon.metering.sse import SSEOverflow, SSEParser

log = logging.getLogger(__name__)


class StreamTap:
    """`flow.response.stream` callable: forwards bytes, reads usage on the way.

    Without stripping, every chunk is returned unchanged at once and a copy is
    parsed. With stripping (the proxy added `include_usage`), complete events
    are forwarded as soon as their blank line arrives, except the injected
    usage-only chunk.
    """

    __slots__ = ("meter", "parser", "decoder", "strip", "broken", "first_byte")

    def __init__(self, strip: bool, content_encoding: str | None, max_buffer: int) -> None:
        self.meter = wire.StreamMeter(strip_usage_chunk=strip)
        self.parser = SSEParser(max_buffer=max_buffer)
        self.decoder = decoder_for(content_encoding, limit=max_buffer + 1)
        # Events can only be cut out of an uncompressed stream.
        self.strip = strip and (content_encoding or "").strip().lower() in ("", "identity")
        self.broken: str | None = None if self.decoder else f"unknown content-encoding {content_encoding!r}"
        self.first_byte: float | None = None

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        if self.first_byte is None and data:
            self.first_byte = time.time()
        if self.broken is not None:
            return data
        if self.strip:
            return self._strip(data)
        try:
            for event in self._events(data):
                self.meter.observe(event)
        except SSEOverflow as exc:
            self.parser.drain()
            self._give_up(str(exc))
        except Exception as exc:  # a parser bug must never break the stream
            self._give_up(f"stream parsing failed: {exc!r}")
        return data

    def _events(self, data: bytes):
        assert self.decoder is not None
        if data:
            return self.parser.feed(self.decoder.decompress(data))
        return self.parser.close()

    def _strip(self, data: bytes) -> list[bytes]:
        # Returns at most one non-empty piece: one write per network chunk, and
        # never b"" (HTTP/1 would send it as the chunk that ends the body).
        try:
            events = self._events(data)
        except Exception as exc:  # overflow (or a bug): hand back what is held
            self._give_up(str(exc) if isinstance(exc, SSEOverflow) else f"stream parsing failed: {exc!r}")
            held = self.parser.drain()
            return [held] if held else []
        out: list[bytes] = []
        for event in events:
            keep = True
            if self.broken is None:
                try:
                    keep = self.meter.observe(event)
                except Exception as exc:
                    self._give_up(f"stream parsing failed: {exc!r}")
            if keep:
                raw = event.raw
                if _NULL_USAGE in raw:  # added only because the proxy asked for usage
                    raw = _without_null_usage(raw)
                out.append(raw)
        if self.broken is not None:
            out.append(self.parser.drain())
        if len(out) == 1:  # the usual network chunk: one event
            return out if out[0] else []
        joined = b"".join(out)
        return [joined] if joined else []

    def _give_up(self, reason: str) -> None:
        self.broken = reason
        log.warning("usage: %s; forwarding the rest of the stream untouched", reason)


_NULL_USAGE = b'"usage":null'


def _without_null_usage(raw: bytes) -> bytes:
    """The chunk as upstream sends it to a client that did not ask for usage: without `"usage":null`.

    Quotes inside JSON strings are escaped, so the unescaped key can only be a key.
    """
    for form in (b',"usage":null', b'"usage":null,'):
        stripped = raw.replace(form, b"", 1)
        if len(stripped) != len(raw):
            return stripped
    return raw
