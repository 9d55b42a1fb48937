"""Pure functions that turn OpenAI requests and responses into usage figures.

Nothing here touches mitmproxy or SQLite, so every rule can be unit tested.
Every nested field of OpenAI's payloads is optional; parse defensively.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

from addon.metering.sse import SSEEvent

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
    # Billed separately (parts of input / output, like cached and reasoning):
    audio_input_tokens: int | None = None
    audio_output_tokens: int | None = None
    image_input_tokens: int | None = None
    image_output_tokens: int | None = None
    cache_write_tokens: int | None = None
    cached_audio_tokens: int | None = None  # part of cached_tokens and of audio_input_tokens (Realtime)
    reported_total_tokens: int | None = None  # OpenAI's own total_tokens, as sent
    characters: int | None = None  # TTS input characters (tts-1, tts-1-hd)
    images: int | None = None  # images returned by per-image models (DALL-E)
    tool_calls: dict[str, int] | None = None  # hosted tool type -> calls (Responses output items)
    rejected: str | None = None  # set when the raw object had counts that are not numbers (implausible_usage)

    def as_columns(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
            "audio_seconds": self.seconds,
            "audio_input_tokens": self.audio_input_tokens,
            "audio_output_tokens": self.audio_output_tokens,
            "image_input_tokens": self.image_input_tokens,
            "image_output_tokens": self.image_output_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cached_audio_tokens": self.cached_audio_tokens,
            "reported_total_tokens": self.reported_total_tokens,
            "characters": self.characters,
            "images": self.images,
            "tool_calls": json.dumps(self.tool_calls, sort_keys=True) if self.tool_calls else None,
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
    """Normalise any OpenAI `usage` object to input/cached/output/reasoning
    plus the parts billed at their own rates (audio, image, cache writes).

    Follows OpenAI's rule: cached is part of input, reasoning part of output,
    total = input + output; OpenAI's own total is kept as reported_total_tokens.
    Shapes: Chat Completions (`prompt_tokens_details`), Responses and image
    models (`input_tokens_details`), Realtime and transcriptions
    (`input_token_details`), whisper-1 (`type: duration`: no tokens at all).
    """
    if not isinstance(usage, dict):
        return None
    if invalid := invalid_counts(usage):
        return Usage(input_tokens=0, output_tokens=0, total_tokens=0, rejected=invalid)  # counts nothing
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            return Usage(seconds=float(seconds))
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        input_tokens = _int(usage.get("prompt_tokens"))
        output_tokens = _int(usage.get("completion_tokens"))
        details = _dict(usage.get("prompt_tokens_details"))
        out_details = _dict(usage.get("completion_tokens_details"))
    elif "input_tokens" in usage or "output_tokens" in usage:
        input_tokens = _int(usage.get("input_tokens"))
        output_tokens = _int(usage.get("output_tokens"))
        details = _dict(usage.get("input_tokens_details") or usage.get("input_token_details"))
        out_details = _dict(usage.get("output_tokens_details") or usage.get("output_token_details"))
    else:
        return None
    if input_tokens is None and output_tokens is None:
        return None
    reported_total = _int(usage.get("total_tokens"))
    if output_tokens is None and reported_total is not None and input_tokens is not None:
        # Embeddings: only prompt_tokens and total_tokens.
        output_tokens = max(reported_total - input_tokens, 0)
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    cached_details = _dict(details.get("cached_tokens_details"))
    return Usage(
        input_tokens=input_tokens,
        cached_tokens=_int(details.get("cached_tokens")) or 0,
        output_tokens=output_tokens,
        reasoning_tokens=_int(out_details.get("reasoning_tokens")) or 0,
        total_tokens=input_tokens + output_tokens,
        audio_input_tokens=_int(details.get("audio_tokens")),
        audio_output_tokens=_int(out_details.get("audio_tokens")),
        image_input_tokens=_int(details.get("image_tokens")),
        image_output_tokens=_int(out_details.get("image_tokens")),
        cache_write_tokens=_int(details.get("cache_write_tokens")),
        cached_audio_tokens=_int(cached_details.get("audio_tokens")),
        reported_total_tokens=reported_total,
    )


# Service tiers billed at the standard rate.
STANDARD_TIERS = frozenset({"default", "auto", "standard"})


def billed_service_tier(answered: str | None, asked: str | None) -> str | None:
    """The tier a call is billed at: as answered; as asked when the answer says
    none (or only `auto`, which is no tier)."""
    if answered and answered != "auto":
        return answered
    return asked or answered


def processing_of(service_tier: str | None) -> str:
    """The `processing` column of a live call: `standard` or the tier billed
    (the tier answered, else the one asked). Batch rows say `batch`."""
    if not service_tier or service_tier.lower() in STANDARD_TIERS:
        return "standard"
    return service_tier.lower()[:40]


# Responses API output items of hosted tools, billed per call on top of tokens.
BILLED_TOOL_ITEMS = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
}


def tool_calls_of(output: Any) -> dict[str, int] | None:
    """Hosted tool calls among a Responses object's `output` items.

    Code Interpreter is billed per container, not per call: the distinct
    containers are counted under `container`.
    """
    if not isinstance(output, list):
        return None
    calls: dict[str, int] = {}
    containers: set[str] = set()
    for item in output:
        if not isinstance(item, dict):
            continue
        tool = BILLED_TOOL_ITEMS.get(item.get("type"))  # type: ignore[arg-type]
        if tool is None:
            continue
        calls[tool] = calls.get(tool, 0) + 1
        if tool == "code_interpreter":
            container = item.get("container_id")
            containers.add(container if isinstance(container, str) else f"call-{len(containers)}")
    if containers:
        calls["container"] = len(containers)
    return calls or None


def complete_usage(endpoint: str, usage: Usage | None, request: RequestFacts, facts: Any) -> Usage | None:
    """Add what an endpoint bills that its usage object does not say.

    TTS (`audio.speech`) answers audio bytes: tts-1 bills the characters of the
    request's input. DALL-E answers no usage: it bills per image. GPT image
    models report output tokens without details: all of them are image tokens.
    """
    if endpoint == "audio.speech" and request.characters is not None:
        usage = usage or Usage()
        usage.characters = request.characters
    elif endpoint.startswith("images."):
        returned = getattr(facts, "data_items", None)
        if usage is None and returned:
            usage = Usage(images=returned)
        elif usage is not None and usage.output_tokens and usage.image_output_tokens is None:
            usage.image_output_tokens = usage.output_tokens
    return usage


# No single call bills more tokens than this in any one count: the largest
# context is ~1M tokens, outputs ~128k (times `n`). Anything above is a
# hostile or broken answer, as are negative, fractional or non-numeric counts.
MAX_CALL_TOKENS = 100_000_000


def _checked_fields(kind: Any) -> tuple[tuple[str, bool], ...]:
    """(name, holds an integer) of each field of a usage dataclass: looked up once per class, not per row."""
    checked = _CHECKED_FIELDS.get(kind)
    if checked is None:
        checked = _CHECKED_FIELDS[kind] = tuple((item.name, "int" in str(item.type)) for item in fields(kind))
    return checked


_CHECKED_FIELDS: dict[Any, tuple[tuple[str, bool], ...]] = {}


def implausible_usage(usage: Usage, bound: int = MAX_CALL_TOKENS) -> str | None:
    """Why `usage` cannot be true (the row then records no usage), else None.

    Every numeric field of `Usage` is checked, whatever fields it has: counts
    must be integers (not bool) in 0..`bound`, other numbers (seconds) finite
    and non-negative. Parts may not exceed their whole (cached <= input,
    reasoning <= output). A `rejected` reason set while parsing wins.
    """
    rejected = getattr(usage, "rejected", None)
    if rejected:
        return rejected
    for name, integer in _checked_fields(type(usage)):
        value = getattr(usage, name)
        if value is None or isinstance(value, (str, dict, list, tuple)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"usage {name} is not a number ({type(value).__name__})"
        if integer and not isinstance(value, int):
            return f"usage {name} is not an integer ({value!r})"
        if isinstance(value, float) and not math.isfinite(value):
            return f"usage {name} is not finite"
        if value < 0:
            return f"usage {name} is negative ({value})"
        if value > bound:
            return f"usage {name} is implausibly large ({value} > {bound})"
    for part, whole in (("cached_tokens", "input_tokens"), ("reasoning_tokens", "output_tokens")):
        part_value, whole_value = getattr(usage, part, None), getattr(usage, whole, None)
        if isinstance(part_value, int) and isinstance(whole_value, int) and part_value > whole_value:
            return f"usage {part} ({part_value}) exceeds {whole} ({whole_value})"
    return None


def invalid_counts(usage: dict, depth: int = 0) -> str | None:
    """A count in a raw `usage` object that is present but not a whole number, else None.

    parse_usage reads such values as missing (0); a row must not pass them
    off as a true 0. Checks every `*tokens` key and `seconds`, nested details too.
    """
    for key, value in usage.items():
        if isinstance(value, dict) and depth < 3:
            reason = invalid_counts(value, depth + 1)
            if reason:
                return reason
        elif value is not None and isinstance(key, str) and (key.endswith("tokens") or key == "seconds"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"usage {key} is not a number ({type(value).__name__})"
            if key != "seconds" and isinstance(value, float) and not value.is_integer():
                return f"usage {key} is not an integer ({value!r})"
    return None


@dataclass(slots=True)
class BodyFacts:
    """What a complete (non-streamed) JSON response body tells us."""

    usage: Usage | None = None
    model: str | None = None
    response_id: str | None = None
    status: str | None = None  # Responses API object status
    service_tier: str | None = None
    error: str | None = None
    data_items: int | None = None  # images returned (`data` of an images answer)


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
    target: dict[str, Any] = obj["response"] if isinstance(obj.get("response"), dict) else obj
    facts.usage = parse_usage(target.get("usage"))
    if facts.usage is not None:
        facts.usage.tool_calls = tool_calls_of(target.get("output"))
    data = target.get("data")
    if isinstance(data, list) and "created" in target:
        facts.data_items = len(data)
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
    characters: int | None = None  # TTS: characters of `input`
    image_size: str | None = None  # images: `size` and `quality` asked (DALL-E bills per image by both)
    image_quality: str | None = None
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
    text = obj.get("input")
    if isinstance(text, str) and "voice" in obj:  # audio.speech
        facts.characters = len(text)
    for name in ("size", "quality"):
        value = obj.get(name)
        if isinstance(value, str):
            setattr(facts, f"image_{name}", value[:40])
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
            or ('"usage"' in data and _usage_object_in(data))
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


def _usage_object_in(data: str) -> bool:
    # Every chunk says `"usage":null` once include_usage is on: counting is
    # cheaper than searching, and no `"usage"` followed by `:null` can open an object.
    return data.count('"usage"') != data.count('"usage":null') and _USAGE_OBJECT.search(data) is not None
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
