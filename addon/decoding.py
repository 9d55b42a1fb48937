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


class _Brotli:
    def __init__(self) -> None:
        import brotli

        self._d = brotli.Decompressor()

    def decompress(self, data: bytes) -> bytes:
        return self._d.process(data) if data else b""


class _Zstd:
    def __init__(self) -> None:
        import zstandard

        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: bytes) -> bytes:
        return self._d.decompress(data) if data else b""


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """A streaming decoder, or None when the encoding is unknown."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity", "none"):
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(wbits=zlib.MAX_WBITS)
    if encoding == "br":
        return _Brotli()
    if encoding == "zstd":
        return _Zstd()
    return None
