"""Which outcome a finished call gets: the rules, without mitmproxy.

An outcome is one of `ok`, `error`, `no_usage`, `aborted`, `blocked` (the
`outcome` column); the proxy's meter (addon/proxy/meter.py) asks these
functions once an exchange ends and records the row they decide.
"""

from __future__ import annotations

from addon.metering import wire

# Endpoints whose successful answers carry usage.
USAGE_ENDPOINTS = frozenset(
    {
        "chat.completions",
        "completions",
        "responses",
        "embeddings",
        "audio.transcriptions",
        "audio.translations",
        "images.generations",
        "images.edits",
    }
)

Outcome = tuple[str, str | None]  # (outcome, error): the row's outcome column and its error text


def of_stream(status_code: int, broken: str | None, facts: wire.StreamMeter) -> Outcome:
    """A streamed (SSE) response that ended: usage read on the way, or why not."""
    if broken:
        return "no_usage", broken
    if facts.error:
        return "error", facts.error
    if status_code >= 400:
        return "error", f"HTTP {status_code}"
    if facts.usage is None:
        return "no_usage", "stream ended without usage"
    return "ok", None


def of_body(status_code: int, endpoint: str, facts: wire.BodyFacts) -> Outcome:
    """A response read whole (JSON or not; `facts` empty for other bodies)."""
    if status_code >= 400:
        return "error", facts.error or f"HTTP {status_code}"
    if facts.usage is None and not facts.data_items and endpoint in USAGE_ENDPOINTS:
        if facts.status in ("queued", "in_progress"):  # a background response: usage comes with a later poll
            return "ok", None
        return "no_usage", facts.error or "response carried no usage"
    return "ok", None


def of_connection_error(message: str, streamed: bool, request_complete: bool) -> tuple[str, int | None]:
    """(outcome, status) of an exchange that ended in a connection error before its response was done.

    Upstream failing before the client got an answer (connect error, body cut
    short) makes mitmproxy answer the client 502 Bad Gateway: an error. The
    client going away, or a stream cut after it began, is an abort.
    """
    if streamed or client_went_away(message) or not request_complete:
        return "aborted", None
    return "error", 502


def at_shutdown(facts: wire.StreamMeter | None, broken: str | None) -> bool:
    """At shutdown, is an open exchange complete? A stream whose end (with usage) went to the client is."""
    return facts is not None and facts.done and facts.usage is not None and not broken


def client_went_away(message: str) -> bool:
    message = message.lower()
    return "client" in message or "killed" in message
