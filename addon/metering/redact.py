"""Credentials out of what the proxy writes down: headers, URLs (query strings) and body text."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "[redacted]"
REDACT_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"})
REDACT_QUERY = frozenset({"api-key", "api_key", "key", "access_token", "token", "client_secret", "secret", "sig",
                          "signature", "password"})
# Credential-shaped values in bodies: OpenAI keys (sk-, sk-proj-, sk-admin-,
# issued sk-usr-), Realtime client secrets (ek_), session tokens (sess-),
# bearer tokens, and the values of JSON fields named like credentials.
_SECRET_VALUES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_\-]{8,}|ek_[A-Za-z0-9_\-]{8,}|sess-[A-Za-z0-9_\-]{8,})"
    r"|(?<=[Bb]earer )[A-Za-z0-9._~+/=\-]{8,}"
)
_SECRET_FIELDS = re.compile(
    r'("(?:api[_-]?key|apiKey|client_secret|secret|password|access_token|refresh_token|token|authorization)"'
    r'\s*:\s*)"(?:[^"\\]|\\.)*"'
)


def redact_headers(headers: list[tuple[str, str]]) -> list[list[str]]:
    return [[name, REDACTED if name.lower() in REDACT_HEADERS else value] for name, value in headers]


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, REDACTED if k.lower() in REDACT_QUERY else v) for k, v in pairs]
    return urlunsplit(parts._replace(query=urlencode(query, safe="[]")))


def redact_text(text: str) -> str:
    """Credential-shaped values in a body replaced by [redacted]."""
    text = _SECRET_FIELDS.sub(lambda m: m.group(1) + '"' + REDACTED + '"', text)
    return _SECRET_VALUES.sub(REDACTED, text)
