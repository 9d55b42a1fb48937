"""The mitmproxy addon that meters and limits metered WebSockets: one row per response.

Responses WebSocket mode (Codex CLI) and the Realtime API. The upgrade is
classified by UsageMeter like any request (its Call carries the key, label,
project and, for Realtime, the model of the URL); each `response.create` the
client sends becomes a Call of its own, admitted by Limits exactly like an HTTP
request before it is forwarded, and recorded through the meter's row builder
when its terminal event arrives. The pure part is addon/metering/ws_events.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from mitmproxy import ctx, http

from addon.metering import bounded, wire, ws_events
from addon.proxy.limits import Limits, Refusal, refusal_error
from addon.proxy.meter import UPGRADE_CALL, Call, UsageMeter, pool_of

log = logging.getLogger(__name__)

# Messages of a socket kept on the flow (mitmproxy keeps every one otherwise).
KEEP_MESSAGES = 64
POLICY_VIOLATION = 1008


@dataclass(slots=True)
class Socket:
    upgrade: Call
    tracker: ws_events.SocketTracker
    endpoint: wire.Endpoint


class WebSocketMeter:
    def __init__(self, meter: UsageMeter, limits: Limits) -> None:
        self.meter = meter
        self.limits = limits
        self.sockets: dict[str, Socket] = {}

    # -- hooks -------------------------------------------------------------
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        upgrade = flow.metadata.get(UPGRADE_CALL)
        if not isinstance(upgrade, Call) or self.meter.stopped:
            return
        protocol = ws_events.protocol_of(upgrade.path)
        if protocol is None:
            return
        tracker = ws_events.SocketTracker(protocol, upgrade.request.model)
        self.sockets[flow.id] = Socket(upgrade, tracker, wire.Endpoint(protocol))

    def websocket_message(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        sock = self.sockets.get(flow.id)
        if sock is None or flow.websocket is None:
            return None
        messages = flow.websocket.messages
        message = messages[-1]
        if len(messages) > KEEP_MESSAGES:
            del messages[: -KEEP_MESSAGES // 2]
        # A client's binary frame is read too: a server that decodes it as JSON would act on a response.create.
        if message.injected or not (message.is_text or message.from_client):
            return None
        try:
            if message.from_client:
                return self._client_message(flow, sock, message)
            self._server_message(sock, message.content)
        except Exception:  # a bug here must never stop the socket
            log.exception("usage: metering a WebSocket message of %s failed", sock.upgrade.path)
        return None

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        sock = self.sockets.pop(flow.id, None)
        if sock is None:
            return
        ws = flow.websocket
        who = "client" if ws is not None and ws.closed_by_client else "server"
        reason = f"socket closed by the {who}"
        if ws is not None and ws.close_code is not None:
            reason += f" (code {ws.close_code}{': ' + ws.close_reason if ws.close_reason else ''})"
        if flow.error is not None:
            reason = f"socket failed: {flow.error.msg}"
        self._abort(sock, reason)

    def done(self) -> None:
        # Runs before UsageMeter.done (which closes the writer): responses in flight are recorded.
        for sock in list(self.sockets.values()):
            self._abort(sock, "proxy shut down before the response finished")
        self.sockets.clear()

    # -- client ------------------------------------------------------------
    def _client_message(self, flow: http.HTTPFlow, sock: Socket,
                        message) -> Coroutine[Any, Any, None] | None:
        content = message.content
        kind, obj = ws_events.client_event(content, ws_events.CLIENT_EVENTS)
        if kind is None:
            return None
        # A response.create too big to parse (a long context): its top-level keys by a scan, as for HTTP bodies.
        scanned = _scan_top_level(content) if obj is None and kind == "response.create" else None
        pending = sock.tracker.client_event(kind, obj, len(content), message.timestamp or time.time(), scanned)
        if pending is None:
            return None
        call = self._call_for(sock, pending)
        admission = self.limits.admit(call, content)
        if admission is None:
            self._sent(sock, pending)
            return None
        return self._await_admission(flow, sock, pending, message, admission)

    async def _await_admission(self, flow: http.HTTPFlow, sock: Socket, pending: ws_events.Pending, message,
                               admission: Coroutine[Any, Any, Refusal | None]) -> None:
        refusal = await admission
        if refusal is None:
            self._sent(sock, pending)
        else:
            self._refuse(flow, sock, pending, message, refusal)

    def _sent(self, sock: Socket, pending: ws_events.Pending) -> None:
        given_up = sock.tracker.sent(pending)
        if given_up is not None:
            self._emit(sock, given_up)

    def _refuse(self, flow: http.HTTPFlow, sock: Socket, pending: ws_events.Pending, message,
                refusal: Refusal) -> None:
        message.drop()
        call: Call = pending.owner
        call.blocked = True
        call.block_message = refusal.message
        self.meter.record(call, "blocked", error=refusal.message, status=101, ttfb=None, end=time.time(),
                          headers=sock.upgrade.response_headers)
        if ctx.options.usage_block == "kill":
            self._close(flow)
            return
        event: dict[str, Any] = {"type": "error", "error": refusal_error(refusal.status, refusal.message)}
        if sock.tracker.protocol == ws_events.RESPONSES:
            event["status"] = refusal.status
            if pending.lane is not None:
                event["stream_id"] = pending.lane
        else:
            event["event_id"] = "event_usage_" + (pending.event_id or "refused")[:40]
            event["error"]["event_id"] = pending.event_id
        ctx.master.commands.call("inject.websocket", flow, True, json.dumps(event).encode(), True)

    @staticmethod
    def _close(flow: http.HTTPFlow) -> None:
        """usage_block=kill: close the client's connection (mitmproxy 12 cannot send a close frame from an
        addon), which closes the upstream side too."""
        try:
            server = ctx.master.addons.get("proxyserver")
            handler = server.connections[flow.client_conn.id]
            task = handler.transports[handler.client].handler
            task.cancel("usage limit reached")
        except Exception as exc:
            log.warning("usage: could not close the WebSocket of a spent pool: %r", exc)

    # -- server ------------------------------------------------------------
    def _server_message(self, sock: Socket, content: bytes) -> None:
        kind = ws_events.sniff_type(content, ws_events.SERVER_EVENTS)
        if kind is None:
            return
        kind, obj = ws_events.parse_event(content, kind, ws_events.SERVER_EVENTS)
        if kind is None:
            return
        if len(content) > ws_events.MAX_PARSED_FRAME:
            log.warning("usage: %s event of %d bytes on %s not parsed whole", kind, len(content), sock.upgrade.path)
        if obj is None:
            return
        for finished in sock.tracker.server_event(kind, obj, time.time()):
            if isinstance(finished, ws_events.Transcription):
                self._emit_transcription(sock, finished)
            else:
                self._emit(sock, finished)

    # -- rows --------------------------------------------------------------
    def _call_for(self, sock: Socket, pending: ws_events.Pending) -> Call:
        if pending.owner is None:
            pending.owner = self._derive(sock, sock.endpoint, pending.request, pending.started)
        return pending.owner

    def _derive(self, sock: Socket, endpoint: wire.Endpoint, facts: wire.RequestFacts,
                started: float) -> Call:
        """A call of the socket: who and where from the upgrade, what from the client event."""
        upgrade = sock.upgrade
        model = facts.model
        matcher = self.meter.matcher
        pool = pool_of(matcher, model, endpoint.name) if matcher else None
        return dataclasses.replace(
            upgrade, started=started, endpoint=endpoint, request=facts, pool=pool, streamed=True, stream=None,
            blocked=False, block_message=None, finished=False, extra={}, flow=None, transport="websocket",
        )

    def _emit(self, sock: Socket, pending: ws_events.Pending) -> None:
        call = self._call_for(sock, pending)
        ttfb = (pending.first_event - pending.started) * 1000 if pending.first_event else None
        self.meter.record(call, pending.outcome or "aborted", facts=pending.facts, error=pending.error,
                          status=101, ttfb=ttfb, end=pending.ended, headers=sock.upgrade.response_headers)

    def _emit_transcription(self, sock: Socket, done: ws_events.Transcription) -> None:
        facts = wire.RequestFacts(model=done.model, stream=True)
        call = self._derive(sock, wire.Endpoint("realtime.transcription"), facts, done.at)
        body = wire.BodyFacts(usage=done.usage)
        outcome, error = ("ok", None) if done.usage is not None else ("no_usage", "transcription without usage")
        self.meter.record(call, outcome, facts=body, error=error, status=101, ttfb=None, end=done.at,
                          headers=sock.upgrade.response_headers)

    def _abort(self, sock: Socket, reason: str) -> None:
        if self.meter.stopped:
            return
        for pending in sock.tracker.close(time.time()):
            pending.error = reason
            self._emit(sock, pending)


def _scan_top_level(content: bytes) -> wire.RequestFacts:
    """Request facts of a message too big to parse, from its top-level keys only."""
    found = bounded.top_level_fields(content)
    return wire.facts_from_request(found[0] if found else None, len(content))
