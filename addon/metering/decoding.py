"""Incremental content decoding for streamed bodies.

mitmproxy hands stream callables the raw (still encoded) bytes; to read
usage out of a compressed SSE stream we decode a copy as it passes.
"""

from __future__ import annotations

import zlib
from typing import Protocol


class Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class _Identity:
    def decompress(self, data: bytes) -> bytes:
        return data


class TooMuchOutput(ValueError):
    """One piece of input decodes to more than the decoder's limit (a bomb)."""


class _Zlib:
    def __init__(self, wbits: int, limit: int) -> None:
        self._d = zlib.decompressobj(wbits=wbits)
        self.limit = limit

    def decompress(self, data: bytes) -> bytes:
        out = self._d.decompress(data, self.limit)
        if self._d.unconsumed_tail:
            raise TooMuchOutput(f"{len(data)} bytes of the stream decode to more than {self.limit} bytes")
        return out


class _Brotli:
    def __init__(self, limit: int) -> None:
        import brotli

        self._d = brotli.Decompressor()
        self.limit = limit

    def decompress(self, data: bytes) -> bytes:
        if not data:
            return b""
        out = self._d.process(data, output_buffer_limit=self.limit)
        if not self._d.can_accept_more_data():
            raise TooMuchOutput(f"{len(data)} bytes of the stream decode to more than {self.limit} bytes")
        return out


class _Zstd:
    def __init__(self) -> None:
        import zstandard

        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: bytes) -> bytes:
        return self._d.decompress(data) if data else b""


def decoder_for(content_encoding: str | None, limit: int = 64 * 1024 * 1024) -> Decoder | None:
    """A streaming decoder, or None when the encoding is unknown.

    gzip, deflate and br decoders raise TooMuchOutput when one piece of input
    decodes to more than `limit` bytes, so a compressed stream cannot expand
    without bound on the event loop.
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity", "none"):
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS, limit)
    if encoding == "deflate":
        return _Zlib(zlib.MAX_WBITS, limit)
    if encoding == "br":
        return _Brotli(limit)
    if encoding == "zstd":
        return _Zstd()
    return None
