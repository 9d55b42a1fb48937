"""Pure handling of the events of metered WebSockets: which frames matter, and
which response each server event belongs to.

Two protocols share the transport:

- Responses WebSocket mode (`/v1/responses` upgraded, Codex CLI): every client
  `response.create` is one response; the server answers with the SSE stream's
  events, one JSON text frame each, ending in `response.completed`,
  `response.incomplete`, `response.failed` or `error`. Responses may run side by
  side on lanes (`stream_id`, echoed by every event; FIFO within a lane).
- Realtime (`/v1/realtime`): each `response.create` (or a response the server
  starts itself, voice activity) ends in `response.done` with `response.usage`;
  input audio transcriptions report their own `usage`.

Every frame passes through the proxy, so the type is sniffed from the first
bytes and only the few events that carry facts are parsed as JSON, up to
MAX_PARSED_FRAME bytes. Nothing here touches mitmproxy.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from addon.metering import wire

# Frames larger than this are forwarded, never parsed.
MAX_PARSED_FRAME = 4 * 1024 * 1024
# Responses waiting for their end on one socket; beyond it the oldest is given up.
MAX_IN_FLIGHT = 256

RESPONSES = "responses"
REALTIME = "realtime"

_TERMINAL_RESPONSES = frozenset({"response.completed", "response.incomplete", "response.failed"})
_STARTED = frozenset({"response.created", "response.queued", "response.in_progress"})
TRANSCRIPTION_DONE = "conversation.item.input_audio_transcription.completed"
# Server events parsed as JSON; every other one is only forwarded.
SERVER_EVENTS = _TERMINAL_RESPONSES | _STARTED | {
    "error", "response.done", "session.created", "session.updated", TRANSCRIPTION_DONE,
}
CLIENT_EVENTS = frozenset({"response.create", "session.update"})

_HEAD = b'{"type":"'
_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_.]{1,80})"')
_HEAD_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([a-z_.]{1,80})"')


def protocol_of(path: str) -> str | None:
    """The WebSocket protocol of an upgraded request path, None for other sockets."""
    name = wire.classify("GET", path).name
    if name == "responses":
        return RESPONSES
    if name == "realtime":
        return REALTIME
    return None


def client_event(content: bytes, wanted: frozenset[str]) -> tuple[str | None, dict[str, Any] | None]:
    """parse_event for client frames, which a client may shape to slip past the sniff: a frame whose type
    the bytes could misstate (no plain head, an escape, a second "type" key: JSON parsers read them and
    upstream obeys) is parsed, once, when it is not too big to parse."""
    head = _HEAD_TYPE.match(content)
    if len(content) <= MAX_PARSED_FRAME and (
        head is None or b"\\" in content or _may_repeat_type(content, head.end())
    ):
        obj = wire.parse_json(content)
        kind = obj.get("type") if isinstance(obj, dict) else None
        return (kind, obj) if isinstance(kind, str) and kind in wanted else (None, None)
    kind = head.group(1).decode("ascii") if head is not None else sniff_type(content, wanted)
    if kind is None or kind not in wanted:
        return None, None
    return parse_event(content, kind, wanted)


def _may_repeat_type(content: bytes, start: int, quotes: int = 64) -> bool:
    """A `"type"` after `start`, or too many strings to tell cheaply. Jumps from quote to quote (memchr):
    an audio append's megabytes of base64 hold none, where a substring search would read every byte."""
    at = start
    for _ in range(quotes):
        at = content.find(b'"', at)
        if at < 0:
            return False
        if content.startswith(b'type"', at + 1):
            return True
        at += 1
    return True


def sniff_type(content: bytes, wanted: frozenset[str]) -> str | None:
    """The event type of a text frame when it is one of `wanted`, without parsing JSON.

    OpenAI and its SDKs put `type` first; then only the head is read. Otherwise
    every `"type":"..."` of the frame (of its first 64 KB when it is too big to
    parse) is looked at: a nested one may come first, the parse decides.
    """
    if content.startswith(_HEAD):
        end = content.find(b'"', 9, 90)
        if end > 0:
            kind = content[9:end].decode("ascii", "replace")
            return kind if kind in wanted else None
    head = _HEAD_TYPE.match(content)  # json.dumps' default spacing
    if head is not None:
        kind = head.group(1).decode("ascii")
        return kind if kind in wanted else None
    if content[:1] != b"{":
        return None
    region = content if len(content) <= MAX_PARSED_FRAME else content[:65536]
    for match in _TYPE.finditer(region):
        kind = match.group(1).decode("ascii")
        if kind in wanted:
            return kind
    return None


def parse_event(content: bytes, sniffed: str, wanted: frozenset[str]) -> tuple[str | None, dict[str, Any] | None]:
    """(type, JSON object) of a frame sniffed as `sniffed`: the type is the top-level one when the frame
    parses (None when that is not `wanted`); a frame too big to parse keeps the sniffed type, without object."""
    if len(content) > MAX_PARSED_FRAME:
        return sniffed, _large_terminal(content, sniffed)
    obj = wire.parse_json(content)
    if not isinstance(obj, dict):
        return None, None
    kind = obj.get("type")
    return (kind, obj) if isinstance(kind, str) and kind in wanted else (None, None)


_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')
_USAGE_KEY = b'"usage":'


def _large_terminal(content: bytes, kind: str) -> dict[str, Any] | None:
    """A terminal event too big to parse whole (a long output echoed): its response id from the head and
    its last `usage` object, decoded alone. Other big events are not looked into."""
    if kind not in _TERMINAL_RESPONSES and kind != "response.done":
        return None
    found = _ID.search(content, 0, 4096)
    at = content.rfind(_USAGE_KEY)
    usage = None
    if at >= 0:
        try:
            usage, _ = json.JSONDecoder().raw_decode(content[at + len(_USAGE_KEY) : at + 65536].decode().lstrip())
        except (ValueError, UnicodeDecodeError):
            usage = None
    response = {"usage": usage, "status": kind.rsplit(".", 1)[-1] if kind != "response.done" else None}
    if found:
        response["id"] = found.group(1).decode()
    return {"type": kind, "response": response}


@dataclass(slots=True)
class Pending:
    """One response on a socket, from its `response.create` to its terminal event."""

    started: float
    request: wire.RequestFacts
    lane: str | None = None  # stream_id (Responses)
    event_id: str | None = None  # the client's event_id (Realtime errors point at it)
    response_id: str | None = None
    first_event: float | None = None
    ended: float | None = None
    facts: wire.BodyFacts = field(default_factory=wire.BodyFacts)
    outcome: str | None = None  # ok | error | no_usage once finished
    error: str | None = None
    owner: Any = None  # the caller's handle (the row's Call)


@dataclass(slots=True)
class Transcription:
    """Usage of one Realtime input audio transcription."""

    model: str | None
    usage: wire.Usage | None
    item_id: str | None
    at: float


def request_facts(obj: dict[str, Any], size: int) -> wire.RequestFacts:
    """What a `response.create` asks for. Responses: the fields of POST /v1/responses;
    Realtime: inside `response`."""
    body: dict[str, Any] = obj["response"] if isinstance(obj.get("response"), dict) else obj
    facts = wire.facts_from_request(body, size)
    if facts.max_output_tokens is None:
        # Realtime's spelling; "inf" means no limit.
        limit = body.get("max_response_output_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            facts.max_output_tokens = limit
    facts.stream = True
    return facts


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class SocketTracker:
    """Matches a socket's server events to the responses its client asked for."""

    def __init__(self, protocol: str, model: str | None = None) -> None:
        self.protocol = protocol
        self.model = model  # Realtime: the session's model
        self.transcription_model: str | None = None
        self.lanes: dict[str | None, deque[Pending]] = {}
        self.by_id: dict[str, Pending] = {}
        self.in_flight = 0

    # -- client ------------------------------------------------------------
    def client_event(self, kind: str, obj: dict[str, Any] | None, size: int, now: float,
                     scanned: wire.RequestFacts | None = None) -> Pending | None:
        """A client frame: a Pending for `response.create` (not yet tracked: see `sent`), else None.

        `scanned`: what a cheap scan found in a frame too big to parse (`obj` is then None)."""
        if kind == "session.update":
            if obj is not None:
                self._session(obj.get("session"))
            return None
        if obj is not None:
            facts = request_facts(obj, size)
        else:
            facts = scanned or wire.RequestFacts(input_chars=size)
            facts.stream = True
        if self.protocol == REALTIME and facts.model is None:
            facts.model = self.model
        pending = Pending(started=now, request=facts)
        if obj is not None:
            pending.lane = _str(obj.get("stream_id")) if self.protocol == RESPONSES else None
            pending.event_id = _str(obj.get("event_id"))
        return pending

    def sent(self, pending: Pending) -> Pending | None:
        """`pending`'s response.create went upstream: follow it. Returns a response given up to stay bounded."""
        self.lanes.setdefault(pending.lane, deque()).append(pending)
        self.in_flight += 1
        if self.in_flight > MAX_IN_FLIGHT:
            oldest = min((lane[0] for lane in self.lanes.values() if lane), key=lambda p: p.started)
            self._finish(oldest, "aborted", "too many responses in flight on one socket", oldest.started)
            return oldest
        return None

    # -- server ------------------------------------------------------------
    def server_event(self, kind: str, obj: dict[str, Any] | None, now: float) -> list[Pending | Transcription]:
        """A parsed server event: the responses (and transcriptions) it finished."""
        if obj is None:
            return []
        if kind in ("session.created", "session.updated"):
            self._session(obj.get("session"))
            return []
        if kind == TRANSCRIPTION_DONE:
            usage = wire.parse_usage(obj.get("usage"))
            return [Transcription(self.transcription_model, usage, _str(obj.get("item_id")), now)]
        if kind == "error":
            return self._error(obj, now)
        response: dict[str, Any] = obj["response"] if isinstance(obj.get("response"), dict) else {}
        rid = _str(response.get("id"))
        pending = self.by_id.get(rid) if rid else None
        if pending is None:
            pending = self._bind(obj, rid, now)
        if pending is None:
            return []
        if pending.first_event is None:
            pending.first_event = now
        facts = wire.facts_from_body(obj)
        pending.facts = _merge(pending.facts, facts)
        if kind in _TERMINAL_RESPONSES or kind == "response.done":
            if pending.facts.error or facts.status == "failed":
                outcome, error = "error", pending.facts.error or "response failed"
            elif facts.usage is None:
                outcome, error = "no_usage", f"{kind} without usage"
            else:
                outcome, error = "ok", None
            self._finish(pending, outcome, error, now)
            return [pending]
        return []

    def close(self, now: float) -> list[Pending]:
        """The socket ended: every response still in flight, aborted."""
        left = [p for lane in self.lanes.values() for p in lane]
        for pending in left:
            self._finish(pending, "aborted", None, now)
        return left

    # -- internals ---------------------------------------------------------
    def _session(self, session: Any) -> None:
        if not isinstance(session, dict):
            return
        self.model = _str(session.get("model")) or self.model
        audio: dict[str, Any] = session["audio"] if isinstance(session.get("audio"), dict) else {}
        audio_in: dict[str, Any] = audio["input"] if isinstance(audio.get("input"), dict) else {}
        for transcription in (audio_in.get("transcription"), session.get("input_audio_transcription")):
            if isinstance(transcription, dict) and _str(transcription.get("model")):
                self.transcription_model = transcription["model"]
                break

    def _bind(self, obj: dict[str, Any], rid: str | None, now: float) -> Pending | None:
        """A response seen for the first time: the oldest unanswered response.create of its lane."""
        lane_id = _str(obj.get("stream_id")) if self.protocol == RESPONSES else None
        lane = self.lanes.get(lane_id)
        pending = next((p for p in lane if p.response_id is None), None) if lane else None
        if pending is None:
            if self.protocol != REALTIME or not rid:
                return None
            # Realtime: the server started a response itself (voice activity detection).
            pending = Pending(started=now, request=wire.RequestFacts(model=self.model, stream=True))
            self.sent(pending)
        if rid:
            pending.response_id = rid
            self.by_id[rid] = pending
        return pending

    def _error(self, obj: dict[str, Any], now: float) -> list[Pending | Transcription]:
        error: dict[str, Any] = obj["error"] if isinstance(obj.get("error"), dict) else obj
        text = wire.facts_from_body({"error": error}).error or "error event"
        pending: Pending | None = None
        if self.protocol == REALTIME:
            # Realtime errors name the client event they answer; others are not a response's.
            event_id = _str(error.get("event_id"))
            pending = next((p for p in self.lanes.get(None) or () if event_id and p.event_id == event_id), None)
        else:
            lane = self.lanes.get(_str(obj.get("stream_id")))
            if lane:
                pending = lane[0]
            elif sum(len(q) for q in self.lanes.values()) == 1:
                pending = next(p for q in self.lanes.values() for p in q)
        if pending is None:
            return []
        if pending.first_event is None:
            pending.first_event = now
        self._finish(pending, "error", text, now)
        return [pending]

    def _finish(self, pending: Pending, outcome: str, error: str | None, now: float) -> None:
        pending.outcome, pending.error, pending.ended = outcome, error, now
        lane = self.lanes.get(pending.lane)
        if lane is not None:
            try:
                lane.remove(pending)
                self.in_flight -= 1
            except ValueError:
                pass
            if not lane:
                del self.lanes[pending.lane]
        if pending.response_id:
            self.by_id.pop(pending.response_id, None)


def _merge(old: wire.BodyFacts, new: wire.BodyFacts) -> wire.BodyFacts:
    return wire.BodyFacts(
        usage=new.usage or old.usage,
        model=new.model or old.model,
        response_id=new.response_id or old.response_id,
        status=new.status or old.status,
        service_tier=new.service_tier or old.service_tier,
        error=new.error or old.error,
    )
