"""The mitmproxy addon that meters OpenAI calls: one row per exchange.

Hooks stay small and never block: the request is inspected (and, for
Chat/Completions streams, asked for a usage chunk), SSE responses are
tapped chunk by chunk without buffering, and the finished row goes to the
writer thread.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import sqlite_utils
from mitmproxy import ctx, exceptions, http

from addon import config as config_mod
from addon.metering import outcome as outcomes
from addon.metering import wire
from addon.metering.bounded import INLINE_BODY, MAX_DECODED_BODY, BodyReader
from addon.metering.outcome import USAGE_ENDPOINTS
from addon.metering.pools import PoolMatcher
from addon.metering.redact import redact_url
from addon.metering.rows import build_row
from addon.metering.stream_tap import StreamTap
from addon.store.writer import Writer
from addon.windows import local_day

log = logging.getLogger(__name__)

# Bodies are decoded within bounded.MAX_DECODED_BODY; those over
# bounded.INLINE_BODY (decoded) are decoded and read on BODY_WORKERS threads,
# so that no client waits on another client's body.
BODY_WORKERS = 2

# flow.metadata key: the Call of a WebSocket upgrade, for the socket's responses.
UPGRADE_CALL = "usage_upgrade_call"

# Flows in flight when a script reload removed the meter: the next instance
# meters them to their end (the module outlives the script's reload).
_HANDOVER: dict[str, Call] = {}

# Requests that open a door to spending elsewhere: an ephemeral Realtime key.
REALTIME_DOORS = frozenset({"realtime.client_secrets", "realtime.sessions", "realtime.transcription_sessions"})
__all__ = ["UPGRADE_CALL", "Call", "RowListener", "UsageMeter", "pool_of"]


@dataclass(slots=True)
class Call:
    """What the proxy knows about one metered exchange so far."""

    started: float
    host: str
    method: str
    path: str
    endpoint: wire.Endpoint
    request: wire.RequestFacts
    key_id: str | None = None
    key_hint: str | None = None
    label: str | None = None
    project: str | None = None
    user_agent: str | None = None
    pool: str | None = None
    streamed: bool = False
    stream: StreamTap | None = None
    blocked: bool = False
    block_message: str | None = None
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # for other addons (reservations)
    flow: http.HTTPFlow | None = None
    response_headers: dict[str, str] | None = None  # read once, in responseheaders
    transport: str | None = None  # "websocket" for upgrades and the responses of a socket; else from `streamed`


class RowListener(Protocol):
    """An addon that follows the meter's rows (the Limits addon: reservations settle with them)."""

    def on_row(self, call: Call, row: dict[str, Any]) -> None:
        """A row is complete (event loop), before it goes to the writer."""

    def on_committed(self, rows: list[dict[str, Any]]) -> None:
        """Rows are in the database (writer thread)."""

    def on_dropped(self, rows: list[dict[str, Any]]) -> None:
        """Rows the writer gave up (writer thread): release what they held."""


class UsageMeter:
    """Records every call to the metered hosts as one row in `requests`."""

    def __init__(self) -> None:
        self.config: config_mod.Config | None = None
        self.matcher: PoolMatcher | None = None
        self.writer: Writer | None = None
        self.hosts: list[str] = []
        self.calls: dict[str, Call] = {}
        self.listeners: list[RowListener] = []  # the Limits addon
        self.prepare_rows: Callable[[list[dict[str, Any]]], None] | None = None  # the Pricing addon's Pricer
        self.max_sse_buffer = 16 * 1024 * 1024
        self.stopped = False  # done() ran: the writer is closed
        self.reloading = False  # done() ran for a script reload: flows in flight went to the next instance
        self._host_cache: dict[str, bool] = {}  # request host -> metered
        self._day_cache: tuple[int, str] = (-1, "")  # (quarter hour since the epoch, local day)
        self._body_workers: ThreadPoolExecutor | None = None  # large bodies, off the event loop

    # -- options -----------------------------------------------------------
    def load(self, loader) -> None:
        loader.add_option("usage_db", str, "usage.db", "SQLite file that receives one row per metered call (WAL mode).")
        loader.add_option(
            "usage_config", str, "",
            "TOML file with pools, limits, keys, alerts and prices; empty for the bundled default."
        )
        loader.add_option(
            "usage_hosts",
            str,
            "api.openai.com",
            "Comma-separated hosts to meter; wildcards like *.openai.azure.com allowed. "
            "Other traffic passes untouched.",
        )
        loader.add_option(
            "usage_plain_http", bool, False,
            "Meter plain-HTTP requests to usage_hosts instead of refusing them (a local gateway or test "
            "upstream on a trusted network). Issued keys are still swapped for the shared key over TLS only.",
        )

    def configure(self, updated: set[str]) -> None:
        if _HANDOVER and not self.stopped:  # a script reload: meter the flows still in flight
            self.calls.update(_HANDOVER)
            _HANDOVER.clear()
        if "usage_config" in updated or self.config is None:
            try:
                self.config = config_mod.load_shared(ctx.options.usage_config or None)
            except config_mod.ConfigError as exc:
                raise exceptions.OptionsError(str(exc)) from None
            self.matcher = PoolMatcher(self.config)
            self._day_cache = (-1, "")  # the time zone may have changed
        if "usage_hosts" in updated or not self.hosts:
            hosts = [h.strip().lower() for h in ctx.options.usage_hosts.split(",") if h.strip()]
            if not hosts:
                raise exceptions.OptionsError("usage_hosts: give at least one host, e.g. api.openai.com")
            self.hosts = hosts
            self._host_cache.clear()
        if "usage_db" in updated or self.writer is None:
            if not ctx.options.usage_db:
                raise exceptions.OptionsError("usage_db: give a path for the SQLite database")
            old = self.writer
            self.writer = Writer(ctx.options.usage_db, prepare=self._prepare, after_commit=self._after_commit,
                                 on_drop=self._dropped)
            if old is not None:
                old.close()

    def _prepare(self, rows: list[dict[str, Any]]) -> None:
        if self.prepare_rows is not None:
            self.prepare_rows(rows)

    def _dropped(self, rows: list[dict[str, Any]]) -> None:
        """Rows the writer had to give up (writer thread): listeners release what they held."""
        for listener in self.listeners:
            listener.on_dropped(rows)

    def _after_commit(self, db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
        for listener in self.listeners:
            listener.on_committed(rows)

    def done(self) -> None:
        should_exit = getattr(getattr(ctx, "master", None), "should_exit", None)
        shutting_down = should_exit is None or should_exit.is_set()
        if not shutting_down:
            # A script reload: the flows go on, and so does their metering,
            # in the next instance (their stream taps are on the flows).
            _HANDOVER.update(self.calls)
            self.calls.clear()
            self.reloading = True
        for call in list(self.calls.values()):
            # Flows still open at shutdown: record what is known. A stream
            # whose end already went to the client is complete, not aborted.
            facts = self._stream_facts(call)
            if call.stream is not None and outcomes.at_shutdown(facts, call.stream.broken):
                self._emit(call, None, "ok", facts=facts)
                continue
            self._emit(call, None, "aborted", facts=facts, error="proxy shut down before the exchange finished")
            # Shutting down, mitmproxy may still serve this flow while later
            # addons finish their done(): the client must not get an answer
            # the row says it never got. (A script reload leaves it alone.)
            if shutting_down and call.flow is not None and call.flow.killable:
                call.flow.kill()
        self.calls.clear()
        self.stopped = True
        if self._body_workers is not None:
            self._body_workers.shutdown(wait=False)
        if self.writer is not None:
            self.writer.flush(timeout=30)
            self.writer.close()

    # -- hooks -------------------------------------------------------------
    def is_metered(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == pattern or fnmatch.fnmatchcase(host, pattern) for pattern in self.hosts)

    def metered_destination(self, flow: http.HTTPFlow) -> str | None:
        """The metered host this flow really goes to over TLS, else None.

        The one decision for "meter this flow" and "the shared upstream key may
        be swapped in" (issued keys, body log, WebSocket flows, which are HTTP
        flows that upgraded). It is taken from where mitmproxy connects: the
        request's host, which is the CONNECT target in regular mode, the target
        in reverse mode and the URL's host for absolute-form requests. The Host
        header is never read: a client controls it. Plain HTTP is never metered
        (`request` refuses it for metered hosts), so no key is sent in clear.
        """
        request = flow.request
        if request.scheme != "https" and not ctx.options.usage_plain_http:
            return None
        host = request.host
        metered = self._host_cache.get(host)
        if metered is None:
            metered = self.is_metered(host)
            if len(self._host_cache) >= 1024:
                self._host_cache.clear()
            self._host_cache[host] = metered
        return host if metered else None

    def _refuse_plain_http(self, flow: http.HTTPFlow) -> None:
        """A metered host over plain HTTP: the credential would cross the network in clear."""
        request = flow.request
        if (flow.response is not None or request.scheme != "http" or ctx.options.usage_plain_http
                or not self.is_metered(request.host)):
            return
        message = (f"The usage proxy refuses plain HTTP to {request.host}: API keys would travel unencrypted. "
                   f"Use https://{request.host}.")
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "https_required"}}
        flow.response = http.Response.make(403, json.dumps(body).encode(),
                                           {"content-type": "application/json", "x-should-retry": "false"})

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        # A response set by an earlier addon (an issued-key 401, say) is
        # recorded too; enforcement marks its own refusals as blocked.
        host = None if self.stopped else self.metered_destination(flow)
        if host is None:
            self._refuse_plain_http(flow)
            return None
        headers = _header_map(flow.request.headers)
        reader = _request_reader(flow.request.raw_content or b"", headers)
        if reader is not None and not reader.run(INLINE_BODY):
            return self._inspect_off_loop(flow, host, headers, reader)
        self.calls[flow.id] = self._inspect(flow, host, headers, reader)
        return None

    async def _inspect_off_loop(self, flow: http.HTTPFlow, host: str, headers: dict[str, str],
                                reader: BodyReader) -> None:
        await asyncio.get_running_loop().run_in_executor(self._workers(), reader.run)
        if self.stopped or flow.error is not None:  # the error hook records it
            return
        self.calls[flow.id] = self._inspect(flow, host, headers, reader)

    def _workers(self) -> ThreadPoolExecutor:
        if self._body_workers is None:
            self._body_workers = ThreadPoolExecutor(BODY_WORKERS, thread_name_prefix="usage-body")
        return self._body_workers

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = self.calls.get(flow.id)
        response = flow.response
        if call is None or response is None or call.blocked:
            return
        headers = call.response_headers = _header_map(response.headers)
        if "text/event-stream" not in headers.get("content-type", "").lower():
            return
        strip = call.extra.get("injected_usage", False) and "content-length" not in headers
        call.streamed = True
        call.stream = StreamTap(strip, headers.get("content-encoding"), self.max_sse_buffer)
        call.extra["response_head"] = (response.status_code, headers.get("x-request-id"))  # for done()
        response.stream = call.stream

    def response(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        call = self.calls.pop(flow.id, None)
        if call is None or flow.response is None:
            return None
        if flow.response.status_code == 101 and call.transport == "websocket" and not call.blocked:
            # The upgrade itself is no call: the socket's responses are (addon/proxy/websocket.py).
            flow.metadata[UPGRADE_CALL] = call
            return None
        reader = None
        if call.stream is None and not call.blocked:
            reader = _response_reader(call, flow.response)
            if reader is not None and not reader.run(INLINE_BODY):
                return self._finish_off_loop(call, flow, reader)
        self._finish_safely(call, flow, reader)
        return None

    async def _finish_off_loop(self, call: Call, flow: http.HTTPFlow, reader: BodyReader) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._workers(), reader.run)
        except Exception as exc:
            reader.error = f"internal error: {exc!r}"
        self._finish_safely(call, flow, reader)

    def _finish_safely(self, call: Call, flow: http.HTTPFlow, reader: BodyReader | None) -> None:
        try:
            self._finish(call, flow, reader)
        except Exception as exc:  # never let a bug break the proxy
            log.exception("usage: recording %s %s failed", call.method, call.path)
            self._emit(call, flow, "no_usage", error=f"internal error: {exc!r}")

    def error(self, flow: http.HTTPFlow) -> None:
        call = self.calls.pop(flow.id, None)
        if call is None:
            # The client went away before its request was complete: the
            # request hook never ran, but the exchange is still recorded.
            if self.stopped or flow.request is None or flow.response is not None:
                return
            host = self.metered_destination(flow)
            if host is None:
                return
            call = self._inspect(flow, host, _header_map(flow.request.headers), None)
        message = flow.error.msg if flow.error else "connection error"
        if call.blocked:
            self._emit(call, flow, "blocked", error=call.block_message)
            return
        outcome, status = outcomes.of_connection_error(message, streamed=call.stream is not None,
                                                       request_complete=bool(flow.request.timestamp_end))
        self._emit(call, flow, outcome, facts=self._stream_facts(call), error=message, status=status)

    # -- internals ---------------------------------------------------------
    def _inspect(self, flow: http.HTTPFlow, host: str, headers: dict[str, str], reader: BodyReader | None) -> Call:
        req = flow.request
        endpoint = wire.classify(req.method, req.path)
        raw = req.raw_content or b""
        content_type = headers.get("content-type", "").lower()
        facts = wire.RequestFacts(input_chars=len(raw))
        body_obj: Any = None
        if reader is not None:
            if reader.error:
                log.warning("usage: %s request: %s", redact_url(req.path), reader.error)
            body_obj = reader.fields
            facts = wire.facts_from_request(body_obj, reader.size)
        elif "multipart/form-data" in content_type:
            facts = _scan_multipart(raw)
        websocket = headers.get("upgrade", "").lower() == "websocket"
        if websocket and not facts.model:  # Realtime: the model is in the URL
            facts.model = req.query.get("model") or None
        key = wire.credential(headers)
        key_id, key_hint = wire.key_names(key) if key else (None, None)
        # An addon that rewrites credentials (issued keys) says whose call it is.
        identity = flow.metadata.get("usage_identity")
        call = Call(
            started=req.timestamp_start or time.time(),
            host=host,
            method=req.method,
            path=req.path.split("?", 1)[0][:500],
            endpoint=endpoint,
            request=facts,
            key_id=key_id,
            key_hint=key_hint,
            project=headers.get("openai-project"),
            user_agent=(headers.get("user-agent") or "")[:200] or None,
            flow=flow,
            transport="websocket" if websocket else None,
        )
        if reader is not None and reader.error:
            call.extra["body_note"] = f"request {reader.error}; not fully parsed"
        assert self.matcher is not None and self.config is not None
        if endpoint.name in REALTIME_DOORS and facts.model is None:
            facts.model = _realtime_model(body_obj)
        model = facts.model or endpoint.deployment
        call.pool = pool_of(self.matcher, model, endpoint.name)
        if endpoint.name == "batches":  # a batch's usage counts in the batch pool (its model's, when none)
            call.pool = self.config.batch_pool or (self.matcher.pool_for(model) if model else None)
        elif endpoint.name in REALTIME_DOORS:  # the key spends in the model's pool
            call.pool = self.matcher.pool_for(model)
        if isinstance(identity, dict):
            call.key_id = identity.get("key_id")
            call.key_hint = identity.get("key_hint")
            call.label = identity.get("label")
        rule = self.config.keys.get(call.key_id or "")
        if call.label is None:
            call.label = rule.label if rule else None
        if (
            facts.stream
            and endpoint.name in wire.STREAM_OPTIONS_ENDPOINTS
            and facts.include_usage is not True
            and isinstance(body_obj, dict)
            and reader is not None
            and reader.data is not None
            # Copying is cheap, re-encoding a big body would hold the loop.
            and (reader.identity and reader.size <= MAX_DECODED_BODY or reader.size <= INLINE_BODY)
        ):
            try:
                req.content = _with_include_usage(reader, body_obj)
            except Exception as exc:  # the call is still metered, without usage
                log.warning("usage: could not ask %s for a usage chunk: %r", redact_url(req.path), exc)
            else:
                # The extra chunk can only be removed from an uncompressed stream.
                req.headers["accept-encoding"] = "identity"
                call.extra["injected_usage"] = True
        return call

    def _local_day(self, started: datetime) -> str:
        # Days change on quarter hours in every time zone: one computation
        # per quarter hour instead of one per row.
        quarter = int(started.timestamp() // 900)
        if self._day_cache[0] != quarter:
            day = local_day(started, self.config.timezone) if self.config else started.date().isoformat()
            self._day_cache = (quarter, day)
        return self._day_cache[1]

    def _stream_facts(self, call: Call) -> wire.StreamMeter | None:
        return call.stream.meter if call.stream is not None else None

    def _finish(self, call: Call, flow: http.HTTPFlow, reader: BodyReader | None = None) -> None:
        response = flow.response
        assert response is not None
        if call.blocked:
            self._emit(call, flow, "blocked", error=call.block_message)
            return
        if call.stream is not None:
            tap = call.stream
            outcome, error = outcomes.of_stream(response.status_code, tap.broken, tap.meter)
            self._emit(call, flow, outcome, facts=tap.meter, error=error)
            return
        body_facts = self._body_facts(call, response, reader)
        outcome, error = outcomes.of_body(response.status_code, call.endpoint.name, body_facts)
        self._emit(call, flow, outcome, facts=body_facts, error=error)

    def _body_facts(self, call: Call, response: http.Response, reader: BodyReader | None) -> wire.BodyFacts:
        if reader is None:
            return wire.BodyFacts()
        if reader.fields is None:
            if reader.error:
                log.warning("usage: %s %s response: %s", call.method, redact_url(call.path), reader.error)
                return wire.BodyFacts(error=f"response {reader.error}")
            if response.status_code < 400:
                log.warning("usage: %s %s answered JSON that does not parse", call.method, call.path)
            return wire.BodyFacts(error="response is not valid JSON")
        facts = wire.facts_from_body(reader.fields)
        if reader.error:
            facts.error = facts.error or f"response {reader.error}; not fully parsed"
        return facts

    def _emit(self, call: Call, flow: http.HTTPFlow | None, outcome: str, *, facts: Any = None,
              error: str | None = None, status: int | None = None) -> None:
        if call.finished:
            return
        response = flow.response if flow is not None else None
        ttfb = None
        end = time.time()
        if response is not None:
            if response.timestamp_start:
                ttfb = (response.timestamp_start - call.started) * 1000
            if call.stream is not None and call.stream.first_byte:
                ttfb = (call.stream.first_byte - call.started) * 1000
            if response.timestamp_end:
                end = response.timestamp_end
        headers = _response_headers(call, response) if response is not None else {}
        if response is None and "response_head" in call.extra:  # shut down mid-stream
            status = status or call.extra["response_head"][0]
            headers = {"x-request-id": call.extra["response_head"][1]}
        if status is None and response is not None:
            status = response.status_code
        self.record(call, outcome, facts=facts, error=error, status=status, ttfb=ttfb, end=end, headers=headers)

    def record(self, call: Call, outcome: str, *, facts: Any = None, error: str | None = None,
               status: int | None = None, ttfb: float | None = None, end: float | None = None,
               headers: dict[str, str] | None = None) -> None:
        """Build the row of a finished call (HTTP exchange or WebSocket response) and hand it to the writer.

        `ttfb` is in ms from `call.started`; `end` a timestamp (now when omitted).
        """
        if call.finished:
            return
        call.finished = True
        row = build_row(call, outcome, facts=facts, error=error, status=status, ttfb=ttfb,
                        end=end if end is not None else time.time(), headers=headers or {}, day=self._local_day,
                        pool_for=self.matcher.pool_for if self.matcher else None,
                        batch_pool=self.config.batch_pool if self.config else None)
        for listener in self.listeners:
            try:
                listener.on_row(call, row)
            except Exception:
                log.exception("usage: listener %r failed", listener)
        if self.writer is not None:
            self.writer.put(row)


def _realtime_model(body: Any) -> str | None:
    """The model of a Realtime client secret or session request: the session's,
    else its transcription's."""
    if not isinstance(body, dict):
        return None
    session: dict[str, Any] = body["session"] if isinstance(body.get("session"), dict) else {}
    audio: dict[str, Any] = session["audio"] if isinstance(session.get("audio"), dict) else {}
    audio_input: dict[str, Any] = audio["input"] if isinstance(audio.get("input"), dict) else {}
    for holder in (session, body.get("input_audio_transcription"), audio_input.get("transcription")):
        if isinstance(holder, dict) and isinstance(holder.get("model"), str):
            return holder["model"]
    return None


def pool_of(matcher: PoolMatcher, model: str | None, endpoint: str) -> str | None:
    """The pool a call counts in: its model's, the default pool for a usage-carrying call without a
    model, none for the others (files, listings)."""
    return matcher.pool_for(model) if model or endpoint in USAGE_ENDPOINTS else None


def _header_map(headers: http.Headers) -> dict[str, str]:
    """Lower-cased name -> first value, in one pass over the fields (each
    `headers.get` scans them all)."""
    found: dict[str, str] = {}
    for name, value in headers.fields:
        key = name.decode("latin-1").lower()
        if key not in found:
            found[key] = value.decode("utf-8", "surrogateescape")
    return found


def _response_headers(call: Call, response: http.Response) -> dict[str, str]:
    # An answer made by an addon (a refusal) never passed responseheaders.
    if call.response_headers is None:
        call.response_headers = _header_map(response.headers)
    return call.response_headers


def _request_reader(raw: bytes, headers: dict[str, str]) -> BodyReader | None:
    """A reader for a JSON request body, None for other bodies."""
    content_type = headers.get("content-type", "").lower()
    if raw and "json" in content_type or (raw[:1] in (b"{", b"[") and "multipart" not in content_type):
        return BodyReader(raw, headers.get("content-encoding"))
    return None


def _response_reader(call: Call, response: http.Response) -> BodyReader | None:
    """A reader for a JSON response body, None for other bodies."""
    raw = response.raw_content
    if not raw:
        return None
    headers = _response_headers(call, response)
    if "json" not in headers.get("content-type", "").lower() and raw[:1] not in (b"{", b"["):
        return None
    return BodyReader(raw, headers.get("content-encoding"))


def _with_include_usage(reader: BodyReader, body_obj: dict[str, Any]) -> bytes:
    """The request asking for a usage chunk; a scanned (large) body is edited in place."""
    assert reader.data is not None
    if reader.spans is None or "stream_options" not in reader.spans:
        return wire.with_include_usage(reader.data, body_obj)
    options = body_obj.get("stream_options")
    start, end = reader.spans["stream_options"]
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return reader.data[:start] + json.dumps(merged, separators=(",", ":")).encode("ascii") + reader.data[end:]


_FORM_FIELD = re.compile(rb'name="(model|stream|size|quality)"\r?\n(?:[^\r\n]+\r?\n)*\r?\n([^\r\n]{0,200})')


def _scan_multipart(body: bytes) -> wire.RequestFacts:
    facts = wire.RequestFacts(input_chars=len(body))
    for name, value in _FORM_FIELD.findall(body[:1_000_000]):
        text = value.decode("utf-8", "replace").strip()
        if name == b"model":
            facts.model = text or None
        elif name == b"stream":
            facts.stream = text.lower() == "true"
        else:  # images edits/variations: size and quality
            setattr(facts, f"image_{name.decode()}", text[:40] or None)
    return facts
