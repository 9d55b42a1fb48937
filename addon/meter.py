"""Pure functions that turn OpenAI requests and responses into usage figures.

Nothing here touches mitmproxy or SQLite, so every rule can be unit tested.
Every nested field of OpenAI's payloads is optional; parse defensively.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .sse import SSEEvent

# ---------------------------------------------------------------------------
# Endpoints

_AZURE_DEPLOYMENT = re.compile(r"^/openai/deployments/(?P<deployment>[^/]+)(?P<rest>/.*)?$")
_VERSION_PREFIX = re.compile(r"^/(?:openai/)?v\d+(?=/|$)")
_RESPONSE_ID = re.compile(r"^/responses/(?P<id>[^/]+)(?P<rest>/.*)?$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # e.g. "chat.completions", "responses", "responses.get"
    deployment: str | None = None  # Azure deployment name, stands in for the model
    response_id: str | None = None  # for /responses/{id}...


@lru_cache(maxsize=4096)
def classify(method: str, path: str) -> Endpoint:
    """Name the API endpoint of a request path (query string allowed)."""
    path = path.split("?", 1)[0].rstrip("/") or "/"
    deployment = None
    azure = _AZURE_DEPLOYMENT.match(path)
    if azure:
        deployment = azure.group("deployment")
        path = azure.group("rest") or "/"
    else:
        path = _VERSION_PREFIX.sub("", path, count=1) or "/"
    method = method.upper()
    response = _RESPONSE_ID.match(path)
    if response:
        rest = (response.group("rest") or "").strip("/")
        rid = response.group("id")
        if rest == "":
            name = {"GET": "responses.get", "DELETE": "responses.delete"}.get(method, "responses.other")
        else:
            name = "responses." + rest.replace("/", ".")
        return Endpoint(name, deployment, rid)
    parts = [p for p in path.strip("/").split("/") if p]
    # Drop object ids (file-abc, batch_123...) so names stay a small set.
    named = [p for p in parts if not _looks_like_id(p)]
    name = ".".join(named) or "root"
    return Endpoint(name, deployment)


# Path segments of the API that look like ids to the rule below.
_NOT_IDS = frozenset({"transcription_sessions"})


def _looks_like_id(segment: str) -> bool:
    if segment in _NOT_IDS:
        return False
    return bool(re.search(r"[_-][A-Za-z0-9]{8,}$", segment)) or segment.isdigit()


# Endpoints whose streaming form can be asked for a final usage chunk.
STREAM_OPTIONS_ENDPOINTS = frozenset({"chat.completions", "completions"})

# ---------------------------------------------------------------------------
# Usage


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    seconds: float | None = None  # audio billed by duration (whisper-1)

    def as_columns(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
            "audio_seconds": self.seconds,
        }


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def parse_usage(usage: Any) -> Usage | None:
    """Normalise any OpenAI `usage` object to input/cached/output/reasoning.

    Follows OpenAI's rule: cached is part of input, reasoning part of output,
    total = input + output.
    """
    if not isinstance(usage, dict):
        return None
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            return Usage(seconds=float(seconds), total_tokens=0, input_tokens=0, output_tokens=0)
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        input_tokens = _int(usage.get("prompt_tokens"))
        output_tokens = _int(usage.get("completion_tokens"))
        cached = _int(_dict(usage.get("prompt_tokens_details")).get("cached_tokens"))
        reasoning = _int(_dict(usage.get("completion_tokens_details")).get("reasoning_tokens"))
    elif "input_tokens" in usage or "output_tokens" in usage:
        input_tokens = _int(usage.get("input_tokens"))
        output_tokens = _int(usage.get("output_tokens"))
        details = _dict(usage.get("input_tokens_details") or usage.get("input_token_details"))
        cached = _int(details.get("cached_tokens"))
        reasoning = _int(_dict(usage.get("output_tokens_details")).get("reasoning_tokens"))
    else:
        return None
    if input_tokens is None and output_tokens is None:
        return None
    if output_tokens is None and "total_tokens" in usage and input_tokens is not None:
        # Embeddings: only prompt_tokens and total_tokens.
        total = _int(usage.get("total_tokens"))
        output_tokens = max(total - input_tokens, 0) if total is not None else 0
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    return Usage(
        input_tokens=input_tokens,
        cached_tokens=cached or 0,
        output_tokens=output_tokens,
        reasoning_tokens=reasoning or 0,
        total_tokens=input_tokens + output_tokens,
    )


@dataclass(slots=True)
class BodyFacts:
    """What a complete (non-streamed) JSON response body tells us."""

    usage: Usage | None = None
    model: str | None = None
    response_id: str | None = None
    status: str | None = None  # Responses API object status
    service_tier: str | None = None
    error: str | None = None


TERMINAL_RESPONSE_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})


def facts_from_body(obj: Any) -> BodyFacts:
    facts = BodyFacts()
    if not isinstance(obj, dict):
        return facts
    error = obj.get("error")
    if isinstance(error, dict):
        facts.error = _error_text(error)
    elif isinstance(error, str):
        facts.error = error[:500]
    # A Responses object nested in an event or a plain Responses/Chat object.
    target = obj.get("response") if isinstance(obj.get("response"), dict) else obj
    facts.usage = parse_usage(target.get("usage"))
    model = target.get("model")
    facts.model = model if isinstance(model, str) else None
    rid = target.get("id")
    facts.response_id = rid if isinstance(rid, str) else None
    status = target.get("status")
    facts.status = status if isinstance(status, str) else None
    tier = target.get("service_tier")
    facts.service_tier = tier if isinstance(tier, str) else None
    if facts.error is None and facts.status == "failed":
        facts.error = _error_text(_dict(target.get("error"))) or "response failed"
    return facts


def _error_text(error: dict) -> str | None:
    parts = [str(error.get(k)) for k in ("type", "code") if error.get(k)]
    message = error.get("message")
    text = ": ".join(filter(None, ["/".join(parts), str(message) if message else ""]))
    return text[:500] or None


def parse_json(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


# ---------------------------------------------------------------------------
# Requests


@dataclass(slots=True)
class RequestFacts:
    model: str | None = None
    stream: bool = False
    include_usage: bool | None = None  # what the client asked for
    background: bool = False
    max_output_tokens: int | None = None
    service_tier: str | None = None
    input_chars: int = 0  # rough size of the prompt, for estimates
    json_ok: bool = False
    n: int = 1  # choices asked for: each one is billed its own output
    best_of: int | None = None  # legacy completions: candidates generated (and billed)
    previous_response_id: str | None = None  # a continuation: OpenAI bills the previous context again
    conversation: str | None = None  # a Responses conversation id: its latest response's context is input


def facts_from_request(obj: Any, body_size: int = 0) -> RequestFacts:
    facts = RequestFacts(input_chars=body_size)
    if not isinstance(obj, dict):
        return facts
    facts.json_ok = True
    model = obj.get("model")
    facts.model = model if isinstance(model, str) else None
    facts.stream = obj.get("stream") is True
    options = obj.get("stream_options")
    if isinstance(options, dict) and isinstance(options.get("include_usage"), bool):
        facts.include_usage = options["include_usage"]
    facts.background = obj.get("background") is True
    for name in ("max_output_tokens", "max_completion_tokens", "max_tokens"):
        value = _int(obj.get(name))
        if value is not None and value >= 0:
            facts.max_output_tokens = value
            break
    tier = obj.get("service_tier")
    facts.service_tier = tier if isinstance(tier, str) else None
    n = _int(obj.get("n"))
    if n is not None and n > 1:
        facts.n = n
    best_of = _int(obj.get("best_of"))
    if best_of is not None and best_of > 1:
        facts.best_of = best_of
    previous = obj.get("previous_response_id")
    facts.previous_response_id = previous if isinstance(previous, str) and previous else None
    conversation = obj.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    facts.conversation = conversation if isinstance(conversation, str) and conversation else None
    return facts


def with_include_usage(body: bytes, obj: dict[str, Any]) -> bytes:
    """The request body `body` (whose parsed form is `obj`) asking for a usage chunk.

    Usually the request has no `stream_options`: the key is then added at the
    front and the client's bytes are left as they are. Re-serializing would
    cost a millisecond of the event loop per 250 KB of conversation, on every
    call of an agent with a long context. Otherwise (`include_usage: false`,
    other options) the body is written anew with the options merged.
    """
    start = len(body) - len(body.lstrip(b" \t\r\n"))
    # json.loads also reads UTF-16 and UTF-32 (with or without a BOM): ASCII
    # can only go in as it is into UTF-8 without a BOM.
    if "stream_options" not in obj and body[start : start + 1] == b"{" and json.detect_encoding(body) == "utf-8":
        separator = b"," if obj else b""
        return body[: start + 1] + b'"stream_options":{"include_usage":true}' + separator + body[start + 1 :]
    options = obj.get("stream_options")
    merged = {**obj, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
    # ASCII escapes: a lone surrogate (which json.loads accepts) cannot be UTF-8 encoded.
    return json.dumps(merged, separators=(",", ":")).encode("ascii")


# ---------------------------------------------------------------------------
# Streams


@dataclass(slots=True)
class StreamMeter:
    """Follows one SSE response and keeps what matters for the row.

    `strip_usage_chunk` is set when the proxy injected `include_usage`: the
    final usage-only chunk is then dropped before the client sees it.
    """

    strip_usage_chunk: bool = False
    usage: Usage | None = None
    model: str | None = None
    response_id: str | None = None
    status: str | None = None
    service_tier: str | None = None
    error: str | None = None
    events: int = 0
    done: bool = False  # saw [DONE] or a terminal Responses event
    _first_seen: bool = field(default=False, repr=False)

    def observe(self, event: SSEEvent) -> bool:
        """Account for one event; return False when it must be dropped."""
        if event.comment:
            return True
        self.events += 1
        data = event.data
        if data == "[DONE]":
            self.done = True
            return True
        name = event.event
        # Only parse what can matter: the first chunk (model, id), chunks with a
        # usage object (not `"usage":null`, which every chunk carries once
        # include_usage is on), errors, and named events of interest.
        interesting = (
            not self._first_seen
            or ('"usage"' in data and _USAGE_OBJECT.search(data) is not None)
            or '"error"' in data
            or (name is not None and name.startswith(("response.", "error", "transcript.", "speech.")))
        )
        if not interesting:
            return True
        # Cheap skip of Responses deltas: only a few event types matter.
        if name is not None and name.startswith("response.") and name not in _RESPONSE_EVENTS_WITH_FACTS:
            return True
        obj = parse_json(data)
        if not isinstance(obj, dict):
            return True
        self._first_seen = True
        return self._apply(obj, name or _str(obj.get("type")))

    def _apply(self, obj: dict, kind: str | None) -> bool:
        if kind in _RESPONSE_EVENTS_WITH_FACTS or (kind or "").startswith("response."):
            facts = facts_from_body(obj)
            self._take(facts)
            if kind in _TERMINAL_RESPONSE_EVENTS:
                self.done = True
            return True
        if kind == "error" or (kind is None and isinstance(obj.get("error"), dict)):
            facts = facts_from_body(obj if "error" in obj else {"error": obj})
            self.error = facts.error or "stream error"
            return True
        if kind in ("transcript.text.done", "speech.audio.done"):
            self.usage = parse_usage(obj.get("usage")) or self.usage
            self.done = True
            return True
        # Chat Completions / Completions chunk.
        model = obj.get("model")
        if isinstance(model, str):
            self.model = model
        if self.response_id is None and isinstance(obj.get("id"), str):
            self.response_id = obj["id"]
        tier = obj.get("service_tier")
        if isinstance(tier, str):
            self.service_tier = tier
        usage = parse_usage(obj.get("usage"))
        if usage is None:
            return True
        self.usage = usage
        choices = obj.get("choices")
        if self.strip_usage_chunk and not choices:
            return False
        return True

    def _take(self, facts: BodyFacts) -> None:
        self.usage = facts.usage or self.usage
        self.model = facts.model or self.model
        self.response_id = facts.response_id or self.response_id
        self.status = facts.status or self.status
        self.service_tier = facts.service_tier or self.service_tier
        if facts.error:
            self.error = facts.error


_USAGE_OBJECT = re.compile(r'"usage"\s*:\s*\{')
_TERMINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSE_EVENTS_WITH_FACTS = _TERMINAL_RESPONSE_EVENTS | {
    "response.created",
    "response.in_progress",
    "response.queued",
}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------
# Credentials


def credential(headers: Any, query: Any = None) -> str | None:
    """The API key a request carries (OpenAI bearer, Azure api-key)."""
    auth = headers.get("authorization") or ""
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for name in ("api-key", "x-api-key"):
        value = headers.get(name)
        if value:
            return value.strip()
    return None


def key_id(key: str) -> str:
    """Short, stable, non-reversible identifier of a credential."""
    import hashlib

    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@lru_cache(maxsize=1024)
def key_names(key: str) -> tuple[str, str]:
    """(key_id, key_hint) of a credential; memoized, as every request needs them."""
    return key_id(key), key_hint(key)


def key_hint(key: str) -> str:
    """`sk-…` plus the last 4 characters; nothing more of the key."""
    if len(key) < 12:
        return "…"
    prefix = key[:3] if key.startswith("sk-") else ""
    return f"{prefix}…{key[-4:]}"
