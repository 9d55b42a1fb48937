"""Meter OpenAI API traffic through mitmproxy into SQLite."""

__version__ = "0.1.0"
