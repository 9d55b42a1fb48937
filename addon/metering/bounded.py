"""Whole-body decoding with a cap, and a scan of a JSON object's top-level keys.

A megabyte of gzip can expand to a gigabyte: bodies are decoded piece by
piece and given up past MAX_DECODED_BODY, never expanded whole. Small bodies
are decoded and parsed on the event loop (the fast path); `BodyReader.run`
stops at a budget so that the rest can be done on a worker thread.

Bodies larger than INLINE_BODY are not parsed with json.loads (a few MB of
`[{},{},...]` are hundreds of MB of Python objects): `top_level_fields` walks
the text and decodes only the top-level values that are small (model, stream,
usage, ...), skipping big ones (messages, input, data) without building them.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from typing import Any

MAX_DECODED_BODY = 32 * 1024 * 1024  # decoded bytes kept of one body
INLINE_BODY = 1024 * 1024  # decoded bytes decoded and parsed on the event loop
MAX_FIELD = 64 * 1024  # top-level values larger than this are skipped by the scan
PIECE = 256 * 1024  # decoder output per step

IDENTITY = frozenset({"", "identity", "none"})


class UnknownEncoding(ValueError):
    pass


def _zlib_pieces(raw: bytes, wbits: int) -> Iterator[bytes]:
    decoder = zlib.decompressobj(wbits=wbits)
    data = raw
    while True:
        piece = decoder.decompress(data, PIECE)
        if piece:
            yield piece
        data = decoder.unconsumed_tail
        if decoder.eof:
            return
        if not data and not piece:
            raise ValueError("compressed body is truncated")


def _deflate_pieces(raw: bytes) -> Iterator[bytes]:
    # "deflate" is zlib-wrapped by the standard, raw deflate in practice too.
    try:
        first = zlib.decompressobj().decompress(raw[:64])
    except zlib.error:
        first = None
    yield from _zlib_pieces(raw, zlib.MAX_WBITS if first is not None else -zlib.MAX_WBITS)


def _brotli_pieces(raw: bytes) -> Iterator[bytes]:
    import brotli

    decoder = brotli.Decompressor()
    piece = decoder.process(raw, output_buffer_limit=PIECE)
    while True:
        if piece:
            yield piece
        if decoder.is_finished():
            return
        if decoder.can_accept_more_data():
            raise ValueError("compressed body is truncated")
        piece = decoder.process(b"", output_buffer_limit=PIECE)


def _zstd_pieces(raw: bytes) -> Iterator[bytes]:
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    while piece := reader.read(PIECE):
        yield piece


def decoded_pieces(raw: bytes, encoding: str | None) -> Iterator[bytes]:
    """The decoded body, a piece (at most PIECE bytes) at a time.

    Raises UnknownEncoding for an encoding it cannot decode; the iterator
    raises ValueError (or the codec's error) for a corrupt body.
    """
    name = (encoding or "").strip().lower()
    if name in IDENTITY:
        return iter((raw,))
    if name in ("gzip", "x-gzip"):
        return _zlib_pieces(raw, 16 + zlib.MAX_WBITS)
    if name == "deflate":
        return _deflate_pieces(raw)
    if name == "br":
        return _brotli_pieces(raw)
    if name == "zstd":
        return _zstd_pieces(raw)
    raise UnknownEncoding(f"unknown content-encoding {encoding!r}")


class BodyReader:
    """Decodes one body within `limit` and reads its JSON, in steps.

    `run(budget)` on the event loop does the work if it fits in `budget`
    decoded bytes and returns True; otherwise it stops and returns False, and
    `run()` (on a worker thread) finishes it. Afterwards:

    - `fields`: the JSON value (parsed whole when at most `budget`/INLINE_BODY
      bytes), else a dict of the small top-level values of the object
      (`top_level_fields`); None when the body is not JSON;
    - `spans`: for scanned objects, key -> (start, end) of each top-level value in `data`;
    - `data`: the decoded body (None when undecodable or over the limit; an
      identity body is always whole: it is in memory already);
    - `size`: decoded bytes seen (at least `limit` + 1 when over it);
    - `error`: why the body could not be read in full (over the limit, undecodable).
    """

    __slots__ = ("raw", "limit", "identity", "data", "fields", "spans", "size", "error", "done",
                 "_pieces", "_out")

    def __init__(self, raw: bytes, encoding: str | None, limit: int = MAX_DECODED_BODY) -> None:
        self.raw = raw
        self.limit = limit
        self.identity = (encoding or "").strip().lower() in IDENTITY
        self.data: bytes | None = None
        self.fields: Any = None
        self.spans: dict[str, tuple[int, int]] | None = None
        self.size = 0
        self.error: str | None = None
        self.done = False
        self._out: list[bytes] = []
        self._pieces: Iterator[bytes] | None = None
        if self.identity:  # already in memory as it is: read whole, however large
            self.size = len(raw)
            self.data = raw
        else:
            try:
                self._pieces = decoded_pieces(raw, encoding)
            except UnknownEncoding as exc:
                self.error = str(exc)
                self.done = True

    @property
    def over_limit(self) -> bool:
        return self.size > self.limit

    def run(self, budget: int | None = None) -> bool:
        """Work on; False when stopped at `budget` decoded bytes (call again without one)."""
        if self.done:
            return True
        if self._pieces is not None:
            try:
                for piece in self._pieces:
                    self._out.append(piece)
                    self.size += len(piece)
                    if self.size > self.limit:
                        self.error = f"body decodes to more than the {self.limit >> 20} MB limit"
                        self._pieces = None
                        break
                    if budget is not None and self.size > budget:
                        return False
                else:
                    self._pieces = None
                    self.data = b"".join(self._out)
                    self._out = []
            except Exception as exc:  # zlib.error, brotli.error, ZstdError, truncated
                self._pieces, self._out = None, []
                self.error = f"cannot decode the body: {exc}"
                self.done = True
                return True
        text = self.data
        if text is None and self.over_limit:
            text = b"".join(self._out)  # what fits in the limit: scan its top level
        if text is not None:
            if budget is not None and len(text) > budget:
                return False
            if len(text) <= INLINE_BODY and self.data is not None:
                try:
                    self.fields = json.loads(text)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    self.fields = None
            else:
                scanned = top_level_fields(text)
                if scanned is not None:
                    self.fields, self.spans = scanned
        self._out = []
        self.done = True
        return True


_WS = re.compile(rb"[ \t\r\n]*")
_SCALAR = re.compile(rb"[^,}\]\s]+")
_SPECIAL = re.compile(rb'["\[\]{}]')
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
# Regex searches hold the GIL: long runs are searched a window at a time so
# that the event loop thread gets its turns while a worker scans a big body.
_WINDOW = 256 * 1024


def _string_end(text: bytes, pos: int) -> int | None:
    """The index after the string that opens at `pos`; None when it is cut short."""
    size = len(text)
    at = pos + 1
    while True:
        limit = min(at + _WINDOW, size)
        end = _STRING_BODY.match(text, at, limit).end()
        if end < limit:
            if text[end] == 0x22:
                return end + 1
            if end + 1 == limit < size:  # a backslash at the window's edge: its escaped byte is in the next one
                at = end
                continue
            return None
        if limit == size:
            return None
        at = end


def _skip_nested(text: bytes, pos: int) -> int | None:
    """The index after the array or object that opens at `pos`; None when cut short."""
    depth = 0
    size = len(text)
    at = pos
    while at < size:
        match = _SPECIAL.search(text, at, min(at + _WINDOW, size))
        if match is None:
            at = min(at + _WINDOW, size)
            continue
        found = match.start()
        char = text[found]
        if char == 0x22:
            end = _string_end(text, found)
            if end is None:
                return None
            at = end
            continue
        depth += 1 if char in (0x5B, 0x7B) else -1
        at = found + 1
        if depth == 0:
            return at
    return None


Spans = dict[str, tuple[int, int]]


def top_level_fields(text: bytes, max_value: int = MAX_FIELD) -> tuple[dict[str, Any], Spans] | None:
    """The small top-level values of a JSON object, without parsing the rest.

    Returns (values, spans): values of the keys whose JSON text is at most
    `max_value` bytes, and the (start, end) of every key's value in `text`.
    A later duplicate key wins, as with json.loads. A text cut short or
    malformed gives what was read before the problem; None when `text` is
    not a JSON object (or not UTF-8 at the top level).
    """
    pos = _WS.match(text, 0).end()
    if text[pos : pos + 1] != b"{":
        return None
    values: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    pos += 1
    try:
        while True:
            pos = _WS.match(text, pos).end()
            if text[pos : pos + 1] != b'"':
                break
            key_end = _string_end(text, pos)
            if key_end is None:
                break
            key = json.loads(text[pos:key_end])
            pos = _WS.match(text, key_end).end()
            if text[pos : pos + 1] != b":":
                break
            start = pos = _WS.match(text, pos + 1).end()
            first = text[pos : pos + 1]
            if first == b'"':
                end = _string_end(text, pos)
            elif first in (b"{", b"["):
                end = _skip_nested(text, pos)
            else:
                match = _SCALAR.match(text, pos)
                end = match.end() if match else None
            if end is None:
                break
            spans[key] = (start, end)
            if end - start <= max_value:
                values[key] = json.loads(text[start:end])
            else:
                values.pop(key, None)
            pos = _WS.match(text, end).end()
            if text[pos : pos + 1] != b",":
                break
            pos += 1
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass
    return values, spans
