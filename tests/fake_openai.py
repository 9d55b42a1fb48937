"""A fake OpenAI API for tests and benchmarks, speaking the real wire formats.

Pretty-printed JSON bodies (gzip, br, zstd or identity), SSE with a delay
between events, Chat Completions usage chunks only when `include_usage` is
asked, Responses API events, background responses, errors.

Test control travels in request headers, which the `openai` SDK can send
with `extra_headers`:

    x-fake-status: 500          answer with this error status
    x-fake-delay: 0.4           seconds between SSE events (default 0); a Chat
                                Completions usage chunk and `[DONE]` follow
                                the finish chunk at once, as from the real
                                API (no token is generated for them)
    x-fake-latency: 0.2         seconds before answering a POST, like a model at work
    x-fake-encoding: gzip       body encoding (default: gzip for JSON)
    x-fake-behavior: ...        reset-mid-stream | no-usage | error-event |
                                non-json | stall | azure-first-chunk |
                                huge-frame | endless-frame | short-body |
                                truncate-stream | stall-headers (sleep
                                x-fake-stall s before answering) |
                                invalid-utf8 (bytes that are not UTF-8 in
                                the JSON body or every SSE event) |
                                dribble (SSE frames sent 7 bytes at a time)
    x-fake-newline: crlf        SSE lines end with CRLF
    x-fake-chunks: 5            content chunks in a stream (default 3)
    x-fake-usage: {json}        answer exactly this usage object (any endpoint's shape)
    x-fake-output: [json]       extra Responses output items (web_search_call, ...)
    x-fake-service-tier: flex   service_tier in the answer; empty: no service_tier key

GET /v1/organization/usage/completions and /v1/organization/costs (admin
key `sk-admin-...`) report the usage this server sent, in buckets.

Run standalone: python tests/fake_openai.py --port 9999 [--tls]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import socket
import ssl
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    at: float = field(default_factory=time.time)  # arrival (organization usage buckets)
    usage_sent: dict | None = None  # the usage object the server produced
    frames: list[bytes] = field(default_factory=list)  # SSE frames the server meant to send
    frames_without_usage: list[bytes] = field(default_factory=list)  # Chat: the stream had usage not been asked
    ws_messages: list[Any] = field(default_factory=list)  # WebSocket client events (parsed JSON or raw bytes)
    ws_usages: list[dict] = field(default_factory=list)  # usage objects sent over the WebSocket


@dataclass
class FakeState:
    received: list[Received] = field(default_factory=list)
    websocket_refuse: bool = False  # answer WebSocket upgrades 426 (clients fall back to HTTP)
    background: dict[str, int] = field(default_factory=dict)  # id -> polls left
    contexts: dict[str, int] = field(default_factory=dict)  # response id -> its input + output (continuations)
    conversations: dict[str, str] = field(default_factory=dict)  # conversation id -> its latest response id
    batches: dict[str, dict] = field(default_factory=dict)  # batch id -> batch object
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self, path_part: str = "") -> list[Received]:
        with self.lock:
            return [r for r in self.received if path_part in r.path]

    def clear(self) -> None:
        with self.lock:
            self.received.clear()
            self.websocket_refuse = False

    def usage_served(self, path_part: str = "") -> list[dict]:
        """Every usage object this server sent (HTTP answers and WebSocket events)."""
        with self.lock:
            found = []
            for r in self.received:
                if path_part in r.path:
                    found += [r.usage_sent] if r.usage_sent else []
                    found += r.ws_usages
            return found


def count_tokens(obj: Any) -> int:
    """Deterministic stand-in for a tokenizer: ~4 characters per token."""
    return max(1, len(json.dumps(obj, sort_keys=True)) // 4)


def encode(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    if encoding == "br":
        import brotli

        return brotli.compress(body)
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(body)
    return body


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm the
    # second waits for the peer's delayed ACK (40 ms), which real APIs never
    # show and which would hide the proxy's own cost in benchmarks.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ------------------------------------------------------------
    def _read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("content-encoding") == "gzip":
            # At most 64 MB: tests send decompression bombs through the proxy.
            body = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(body, 64 * 1024 * 1024)
        return body

    def _record(self, body: bytes) -> Received:
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, RecursionError):
            parsed = None
        received = Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, parsed)
        with self.server.state.lock:
            self.server.state.received.append(received)
        self.received_now = received
        return received

    def _json(self, status: int, obj: Any, extra_headers: dict[str, str] | None = None) -> None:
        behavior = self.headers.get("x-fake-behavior", "")
        body = json.dumps(obj, indent=2).encode() if behavior != "non-json" else b"<html>upstream oops</html>"
        if behavior == "invalid-utf8":
            body = body.replace(b'"object"', b'"obj\xff\xfeect"', 1)
        encoding = self.headers.get("x-fake-encoding", "gzip")
        accepted = self.headers.get("accept-encoding", "")
        if encoding != "identity" and encoding not in accepted and encoding != "bogus":
            encoding = "identity"
        payload = encode(body, encoding) if encoding != "bogus" else body
        self.send_response(status)
        self.send_header("content-type", "application/json" if behavior != "non-json" else "text/html")
        self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:16])
        self.send_header("openai-processing-ms", "12")
        if encoding != "identity":
            self.send_header("content-encoding", encoding)
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        if behavior == "short-body":
            # Announce more than is sent, then close.
            self.send_header("content-length", str(len(payload) + 100))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int) -> None:
        kinds = {
            400: ("invalid_request_error", None),
            401: ("invalid_request_error", "invalid_api_key"),
            404: ("invalid_request_error", "model_not_found"),
            429: ("requests", "rate_limit_exceeded"),
            500: ("server_error", None),
            503: ("server_error", None),
        }
        kind, code = kinds.get(status, ("server_error", None))
        self._json(
            status,
            {"error": {"message": f"fake error {status}", "type": kind, "param": None, "code": code}},
            {"x-should-retry": "false"},
        )

    # -- SSE -----------------------------------------------------------------
    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:16])
        self.send_header("transfer-encoding", "chunked")
        self.send_header("cache-control", "no-cache")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _sse_end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _sse(self, frames: list[bytes], immediate_tail: int = 0) -> None:
        """Send frames with x-fake-delay between them, except before the last
        `immediate_tail` ones, which the model does not have to generate."""
        delay = float(self.headers.get("x-fake-delay") or 0)
        behavior = self.headers.get("x-fake-behavior", "")
        if self.headers.get("x-fake-newline") == "crlf":
            frames = [frame.replace(b"\n", b"\r\n") for frame in frames]
        current = getattr(self, "received_now", None)
        if current is not None:
            current.frames = list(frames)
        self._sse_start()
        for index, frame in enumerate(frames):
            if behavior == "reset-mid-stream" and index == len(frames) // 2:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                self.close_connection = True
                return
            if behavior == "truncate-stream" and index == len(frames) - 2:
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if behavior == "stall" and index == 1:
                time.sleep(float(self.headers.get("x-fake-stall") or 30))
            if index and delay and index < len(frames) - immediate_tail:
                time.sleep(delay)
            if behavior == "invalid-utf8":
                frame = frame.replace(b"data: {", b'data: {"junk\xc3\x28\xff":1,', 1)
            if behavior == "dribble":  # frames cut every 7 bytes: mid-line, mid-UTF-8
                for start in range(0, len(frame), 7):
                    self._chunk(frame[start : start + 7])
                    time.sleep(0.001)
                continue
            self._chunk(frame)
        self._sse_end()

    # -- routes --------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("upgrade", "").lower() == "websocket":
            return FakeWebSocket(self).serve()
        received = self._record(b"")
        match = re.match(r"^/v1/responses/([^/?]+)", self.path)
        if match:
            rid = match.group(1)
            with self.server.state.lock:
                left = self.server.state.background.get(rid)
                if left is not None and left > 0:
                    self.server.state.background[rid] = left - 1
            if left is None:
                return self._error(404)
            if left > 0:
                return self._json(200, _response_object(rid, "gpt-5", "in_progress", None))
            usage = _responses_usage(50, 20, reasoning=8)
            received.usage_sent = usage
            return self._json(200, _response_object(rid, "gpt-5", "completed", usage))
        match = re.match(r"^/v1/batches/([^/?]+)$", self.path)
        if match:
            with self.server.state.lock:
                batch = self.server.state.batches.get(match.group(1))
            if batch is None:
                return self._error(404)
            # Finished at the first look: usage of the whole batch.
            usage = {"input_tokens": 1_500_000, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": 500_000, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": 2_000_000}
            received.usage_sent = usage
            return self._json(200, {**batch, "status": "completed", "model": "gpt-4o-2024-08-06", "usage": usage,
                                    "completed_at": int(time.time())})
        match = re.match(r"^/v1/chat/completions/([^/?]+)$", self.path)
        if match:  # a stored completion read back (free)
            usage = {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50}
            return self._json(200, {"id": match.group(1), "object": "chat.completion", "created": int(time.time()),
                                    "model": "gpt-4o-2024-08-06", "usage": usage, "choices": [
                                        {"index": 0, "finish_reason": "stop", "logprobs": None,
                                         "message": {"role": "assistant", "content": "hi", "refusal": None}}]})
        if self.path.startswith("/v1/organization/"):
            return self._organization()
        if self.path.startswith("/v1/models"):
            return self._json(200, {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})
        self._error(404)

    def do_POST(self) -> None:  # noqa: N802
        raw = self._read_body()
        received = self._record(raw)
        if self.headers.get("x-fake-behavior") == "stall-headers":
            time.sleep(float(self.headers.get("x-fake-stall") or 30))
        latency = float(self.headers.get("x-fake-latency") or 0)
        if latency > 0:
            time.sleep(latency)
        status = int(self.headers.get("x-fake-status") or 0)
        if status:
            return self._error(status)
        path = self.path.split("?", 1)[0]
        body = received.json if isinstance(received.json, dict) else {}
        try:
            if path == "/v1/batches":
                bid = "batch_" + uuid.uuid4().hex[:24]
                batch = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
                         "input_file_id": body.get("input_file_id"), "completion_window": "24h",
                         "status": "validating", "created_at": int(time.time()), "request_counts": {
                             "total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
                with self.server.state.lock:
                    self.server.state.batches[bid] = batch
                return self._json(200, batch)
            if path in ("/v1/realtime/client_secrets", "/v1/realtime/sessions",
                        "/v1/realtime/transcription_sessions"):
                secret = {"value": "ek_" + uuid.uuid4().hex, "expires_at": int(time.time()) + 600}
                if path.endswith("client_secrets"):
                    return self._json(200, {**secret, "session": body.get("session") or {}})
                return self._json(200, {"id": "sess_" + uuid.uuid4().hex[:16], "object": "realtime.session",
                                        "model": body.get("model"), "client_secret": secret})
            if path.endswith("/chat/completions"):
                return self._chat(received, body)
            if path.endswith("/completions"):
                return self._completions(received, body)
            if path.endswith("/responses"):
                return self._responses(received, body)
            if path.endswith("/embeddings"):
                tokens = count_tokens(body.get("input"))
                usage = self._usage_override() or {"prompt_tokens": tokens, "total_tokens": tokens}
                received.usage_sent = usage
                return self._json(200, {"object": "list", "model": body.get("model"), "usage": usage,
                                        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})
            if path.endswith("/audio/transcriptions"):
                return self._transcription(received, raw)
            if path.endswith(("/images/generations", "/images/edits")):
                image = {"b64_json": "aGVsbG8="}
                model = str(body.get("model") or "dall-e-2")
                if model.startswith("dall-e"):  # per-image models answer no usage
                    return self._json(200, {"created": int(time.time()), "data": [image] * int(body.get("n") or 1)})
                usage = self._usage_override() or {
                    "input_tokens": 30, "input_tokens_details": {"text_tokens": 30, "image_tokens": 0},
                    "output_tokens": 4160, "total_tokens": 4190}
                received.usage_sent = usage
                return self._json(200, {"created": int(time.time()), "data": [image], "usage": usage})
            if path.endswith("/audio/speech"):
                return self._speech(received, body)
            if path.endswith("/moderations"):
                return self._json(200, {"id": "modr-1", "model": "omni-moderation-latest", "results": []})
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):  # the client (proxy) hung up
            return
        self._error(404)

    def _chat(self, received: Received, body: dict) -> None:
        model = body.get("model", "gpt-4o")
        served = _served_model(model)
        n = int(body.get("n") or 1)
        chunks = int(self.headers.get("x-fake-chunks") or 3)
        prompt = count_tokens(body.get("messages"))
        completion = chunks * n
        reasoning = completion // 2 if model.startswith(("o", "gpt-5")) else 0
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": prompt // 2, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
        usage = self._usage_override() or usage
        cid = "chatcmpl-" + uuid.uuid4().hex[:20]
        created = int(time.time())
        if not body.get("stream"):
            received.usage_sent = usage
            message = {"role": "assistant", "content": "hello " * chunks, "refusal": None}
            return self._json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": served,
                "choices": [
                    {"index": i, "message": message, "finish_reason": "stop", "logprobs": None} for i in range(n)
                ],
                "usage": usage, **self._tier(), "system_fingerprint": "fp_fake",
            })
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        behavior = self.headers.get("x-fake-behavior", "")
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served,
                **self._tier(), "system_fingerprint": "fp_fake"}
        def build(base: dict, with_usage: bool) -> list[bytes]:
            frames = []
            if behavior == "azure-first-chunk":
                frames.append(_frame({**base, "choices": [], "prompt_filter_results": [{"prompt_index": 0}]}))
            for i in range(n):
                frames.append(_frame({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                            "finish_reason": None}], "obfuscation": "xyz"}))
            for c in range(chunks):
                for i in range(n):
                    frames.append(_frame({**base, "choices": [{"index": i, "delta": {"content": f"tok{c} "},
                                                                "finish_reason": None}], "obfuscation": "ab"}))
            if behavior == "error-event":
                frames.append(_frame({"error": {"message": "The server had an error", "type": "server_error",
                                                "param": None, "code": None}}))
                return frames
            for i in range(n):
                frames.append(_frame({**base, "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]}))
            if behavior == "keepalive":
                frames.insert(2, b": keep-alive\r\n\r\n")
            if with_usage and behavior != "no-usage":
                frames.append(_frame({**base, "choices": [], "usage": usage, "obfuscation": "q"}))
            if behavior == "huge-frame":
                frames.insert(1, _frame({**base, "choices": [{"index": 0, "delta": {"content": "x" * 20_000_000}}]}))
            return frames

        # What upstream sends a client that did not ask for usage: no `usage` key at all (tests compare).
        received.frames_without_usage = build(base, False) + [b"data: [DONE]\n\n"]
        if include_usage:
            base["usage"] = None  # with include_usage, every chunk carries "usage": null
        frames = build(base, include_usage)
        if behavior == "error-event":
            return self._sse(frames)
        tail = 1  # [DONE], and the usage chunk: they come with the finish chunk, not a token later
        if include_usage and behavior != "no-usage":
            received.usage_sent = usage
            tail = 2
        if behavior == "endless-frame":
            return self._endless()
        frames.append(b"data: [DONE]\n\n")
        self._sse(frames, immediate_tail=tail)

    def _organization(self) -> None:
        """Admin Usage and Costs APIs, computed from the usage this server really sent.

        GET /v1/organization/usage/completions and /v1/organization/costs with
        start_time, end_time, bucket_width (1d|1h), group_by (model | line_item),
        limit and page, answering pages of buckets like the real API. An admin
        key (`sk-admin-...`) is required.
        """
        from urllib.parse import parse_qs, urlsplit

        if not self.headers.get("authorization", "").startswith("Bearer sk-admin-"):
            return self._json(401, {"error": {"message": "Admin API key required", "type": "invalid_request_error",
                                              "param": None, "code": "invalid_api_key"}})
        url = urlsplit(self.path)
        query = {k.removesuffix("[]"): v for k, v in parse_qs(url.query).items()}
        width = {"1d": 86400, "1h": 3600, "1m": 60}[query.get("bucket_width", ["1d"])[0]]
        start = int(query["start_time"][0]) // width * width
        end = int(query.get("end_time", [time.time()])[0])
        group_by = set(query.get("group_by", []))
        limit = int(query.get("limit", ["7"])[0])
        first = int(query.get("page", ["page_0"])[0].removeprefix("page_"))
        costs = url.path.endswith("/costs")
        with self.server.state.lock:
            served = [r for r in self.server.state.received if r.usage_sent and isinstance(r.json, dict)
                      and re.search(r"/(chat/completions|completions|responses)$", r.path.split("?")[0])]
        starts = list(range(start, end, width))
        data = []
        for bucket_start in starts[first:first + limit]:
            results: dict[tuple, dict] = {}
            for r in served:
                if not bucket_start <= r.at < bucket_start + width:
                    continue
                model = _served_model(r.json.get("model", "gpt-4o"))
                usage = r.usage_sent or {}
                tokens_in = usage.get("prompt_tokens", usage.get("input_tokens", 0))
                tokens_out = usage.get("completion_tokens", usage.get("output_tokens", 0))
                cached = (usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}).get(
                    "cached_tokens", 0)
                if costs:
                    for kind, amount in _line_items(model, tokens_in, cached, tokens_out):
                        item = f"{model}, {kind}" if "line_item" in group_by else None
                        entry = results.setdefault((item,), {"object": "organization.costs.result",
                                                             "amount": {"value": 0.0, "currency": "usd"},
                                                             "line_item": item, "project_id": None})
                        entry["amount"]["value"] += amount
                    continue
                key = (model if "model" in group_by else None,)
                entry = results.setdefault(key, {
                    "object": "organization.usage.completions.result", "input_tokens": 0, "output_tokens": 0,
                    "input_cached_tokens": 0, "input_audio_tokens": 0, "output_audio_tokens": 0,
                    "num_model_requests": 0, "project_id": None, "user_id": None, "api_key_id": None,
                    "model": key[0], "batch": None, "service_tier": None})
                entry["input_tokens"] += tokens_in
                entry["output_tokens"] += tokens_out
                entry["input_cached_tokens"] += cached
                entry["num_model_requests"] += 1
            data.append({"object": "bucket", "start_time": bucket_start, "end_time": bucket_start + width,
                         "results": list(results.values())})
        more = first + limit < len(starts)
        self._json(200, {"object": "page", "data": data, "has_more": more,
                         "next_page": f"page_{first + limit}" if more else None})

    def _endless(self) -> None:
        self._sse_start()
        self._chunk(b"data: ")
        for _ in range(40):
            self._chunk(b"x" * 1_000_000)
        self._sse_end()

    def _completions(self, received: Received, body: dict) -> None:
        prompt = count_tokens(body.get("prompt"))
        usage = self._usage_override() or {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}
        cid = "cmpl-" + uuid.uuid4().hex[:20]
        base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            received.usage_sent = usage
            return self._json(200, {**base, "choices": [{"text": "hi", "index": 0, "finish_reason": "stop",
                                                         "logprobs": None}], "usage": usage})
        frames = [_frame({**base, "choices": [{"text": f"t{i}", "index": 0, "finish_reason": None,
                                               "logprobs": None}]}) for i in range(5)]
        if (body.get("stream_options") or {}).get("include_usage"):
            received.usage_sent = usage
            frames.append(_frame({**base, "choices": [], "usage": usage}))
        frames.append(b"data: [DONE]\n\n")
        self._sse(frames)

    def _responses(self, received: Received, body: dict) -> None:
        model = body.get("model", "gpt-5")
        served = _served_model(model)
        rid = "resp_" + uuid.uuid4().hex[:24]
        prompt = count_tokens(body.get("input"))
        chunks = int(self.headers.get("x-fake-chunks") or 3)
        # A continuation is billed the previous response's whole context again.
        conversation = body.get("conversation")
        conversation = conversation.get("id") if isinstance(conversation, dict) else conversation
        with self.server.state.lock:
            previous = body.get("previous_response_id") or self.server.state.conversations.get(conversation or "")
            prompt += self.server.state.contexts.get(previous or "", 0)
            self.server.state.contexts[rid] = prompt + chunks + 4
            if conversation:
                self.server.state.conversations[conversation] = rid
        usage = self._usage_override() or _responses_usage(prompt, chunks + 4, reasoning=4)
        if body.get("background") and not body.get("stream"):
            with self.server.state.lock:
                self.server.state.background[rid] = int(self.headers.get("x-fake-polls") or 1)
            return self._json(200, _response_object(rid, served, "queued", None))
        if not body.get("stream"):
            received.usage_sent = usage
            return self._json(200, self._decorate(_response_object(rid, served, "completed", usage, text="hello")))
        behavior = self.headers.get("x-fake-behavior", "")
        seq = iter(range(10_000))
        frames = [
            _event("response.created", {"response": self._decorate(_response_object(rid, served, "in_progress",
                                                                                   None))}, seq),
            _event("response.in_progress", {"response": self._decorate(_response_object(rid, served, "in_progress",
                                                                                       None))}, seq),
            _event("response.output_item.added", {"output_index": 0, "item": {"id": "msg_1", "type": "message",
                                                  "status": "in_progress", "content": [], "role": "assistant"}}, seq),
            _event("response.content_part.added", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                   "part": {"type": "output_text", "text": "", "annotations": []}},
                   seq),
        ]
        for i in range(chunks):
            frames.append(_event("response.output_text.delta", {"item_id": "msg_1", "output_index": 0,
                                                                "content_index": 0, "delta": f"w{i} ",
                                                                "logprobs": [], "obfuscation": "zz"}, seq))
        frames.append(_event("response.output_text.done", {"item_id": "msg_1", "output_index": 0,
                                                           "content_index": 0, "text": "done"}, seq))
        part = {"type": "output_text", "text": "done", "annotations": []}
        frames.append(_event("response.content_part.done", {"item_id": "msg_1", "output_index": 0,
                                                            "content_index": 0, "part": part}, seq))
        frames.append(_event("response.output_item.done", {"output_index": 0, "item": {
            "id": "msg_1", "type": "message", "status": "completed", "content": [part], "role": "assistant"}}, seq))
        if behavior == "error-event":
            frames.append(_event("error", {"code": "server_error", "message": "boom", "param": None}, seq))
            return self._sse(frames)
        if behavior == "no-usage":
            return self._sse(frames)
        terminal = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(
            self.headers.get("x-fake-terminal", ""), "response.completed")
        status = terminal.split(".")[1]
        received.usage_sent = usage
        frames.append(_event(terminal, {"response": self._decorate(_response_object(rid, served, status, usage,
                                                                                     text="done"))}, seq))
        self._sse(frames)

    def _transcription(self, received: Received, raw: bytes) -> None:
        match = re.search(rb'name="model"\r\n\r\n([^\r\n]+)', raw)
        model = match.group(1).decode() if match else "whisper-1"
        if model == "whisper-1":
            usage: dict = {"type": "duration", "seconds": 7}
        else:
            usage = {"type": "tokens", "input_tokens": 70, "input_token_details": {"text_tokens": 0,
                                                                                    "audio_tokens": 70},
                     "output_tokens": 12, "total_tokens": 82}
        usage = self._usage_override() or usage
        received.usage_sent = usage
        self._json(200, {"text": "hello world", "usage": usage})

    def _speech(self, received: Received, body: dict) -> None:
        """TTS: audio bytes, or with `stream_format: "sse"` audio deltas and
        `speech.audio.done` carrying usage (gpt-4o-mini-tts)."""
        if body.get("stream_format") != "sse":
            audio = b"ID3\x04fake-mp3" + bytes(range(256))
            self.send_response(200)
            self.send_header("content-type", "audio/mpeg")
            self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:16])
            self.send_header("content-length", str(len(audio)))
            self.end_headers()
            self.wfile.write(audio)
            return
        text = str(body.get("input") or "")
        usage = self._usage_override() or {"input_tokens": max(1, len(text) // 4), "output_tokens": 400,
                                            "total_tokens": max(1, len(text) // 4) + 400}
        received.usage_sent = usage
        frames = [_frame({"type": "speech.audio.delta", "audio": "AAAA"}),
                  _frame({"type": "speech.audio.done", "usage": usage})]
        self._sse(frames)

    def _usage_override(self) -> dict | None:
        raw = self.headers.get("x-fake-usage")
        return json.loads(raw) if raw else None

    def _tier(self) -> dict:
        tier = self.headers.get("x-fake-service-tier")
        if tier is None:
            return {"service_tier": "default"}
        return {"service_tier": tier} if tier else {}

    def _decorate(self, response: dict) -> dict:
        """A Responses object with the test's service tier and extra output items."""
        response.pop("service_tier", None)
        response.update(self._tier())
        extra = self.headers.get("x-fake-output")
        if extra and response.get("status") == "completed":
            response["output"] = json.loads(extra) + response.get("output", [])
        return response


def _line_items(model: str, tokens_in: int, cached: int, tokens_out: int) -> list[tuple[str, float]]:
    """Costs API line items of one call, at genai-prices' standard rates
    (models it does not know: $2.50 / $10 per million input / output tokens)."""
    from genai_prices import Usage, calc_price

    try:
        price = calc_price(Usage(input_tokens=tokens_in, cache_read_tokens=cached, output_tokens=tokens_out), model,
                           provider_id="openai")
    except Exception:
        return [("input", tokens_in * 2.5e-6), ("output", tokens_out * 10e-6)]
    return [("input", float(price.input_price)), ("output", float(price.output_price))]


def _served_model(model: str) -> str:
    snapshots = {"gpt-4o": "gpt-4o-2024-08-06", "gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-5": "gpt-5-2025-08-07"}
    return snapshots.get(model, model)


def _responses_usage(prompt: int, output: int, reasoning: int = 0) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": prompt + output}


def _response_object(rid: str, model: str, status: str, usage: dict | None, text: str = "") -> dict:
    output = []
    if text:
        output = [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
            "output": output, "usage": usage, "background": False, "error": None, "incomplete_details": None,
            "service_tier": "default", "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


def _frame(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _event(kind: str, payload: dict, seq) -> bytes:
    obj = {"type": kind, "sequence_number": next(seq), **payload}
    return f"event: {kind}\n".encode() + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# ---------------------------------------------------------------------------
# WebSocket: Responses WebSocket mode (/v1/responses) and Realtime (/v1/realtime)

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FakeWebSocket:
    """One upgraded connection of the fake server, on the handler's thread.

    Responses WebSocket mode: each `response.create` is answered with the SSE
    stream's events (one JSON text frame each); responses with a `stream_id`
    run on their own lane, concurrently, and echo it. Per-response control in
    the create's `metadata`: `fake_delay` (seconds between events),
    `fake_behavior`: hostile (binary, non-JSON and unknown-type frames first) |
    huge-frame (a 20 MB delta) | no-usage | error-event | stall (stop after
    response.created for `fake_stall` s) | close (close after response.created)
    | failed | incomplete. Realtime: `session.created` on connect,
    `session.update` -> `session.updated`, `response.create` -> `response.done`
    with text/audio usage, `input_audio_buffer.commit` -> a transcription with
    its usage. Upgrades are refused (426) while `state.websocket_refuse` is set.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.state: FakeState = handler.server.state
        self.sock = handler.connection
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        self.lanes: dict[Any, Any] = {}
        self.seq = iter(range(10**9))
        self.received: Received | None = None

    def serve(self) -> None:
        import base64
        import hashlib

        from wsproto.connection import Connection, ConnectionType

        h = self.handler
        self.received = h._record(b"")
        h.close_connection = True
        path = h.path.split("?", 1)[0]
        if self.state.websocket_refuse or not path.endswith(("/responses", "/realtime")):
            return h._json(426 if self.state.websocket_refuse else 404, {"error": {
                "message": "WebSocket upgrade refused by the fake server", "type": "invalid_request_error",
                "param": None, "code": "websocket_not_supported"}})
        key = h.headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        h.send_response(101)
        h.send_header("upgrade", "websocket")
        h.send_header("connection", "Upgrade")
        h.send_header("sec-websocket-accept", accept)
        h.send_header("x-request-id", "req_" + uuid.uuid4().hex[:16])
        h.end_headers()
        h.wfile.flush()
        self.conn = Connection(ConnectionType.SERVER)
        self.realtime = path.endswith("/realtime")
        if self.realtime:
            from urllib.parse import parse_qs, urlsplit

            model = (parse_qs(urlsplit(h.path).query).get("model") or ["gpt-realtime"])[0]
            self.session = {"type": "realtime", "object": "realtime.session", "id": "sess_" + uuid.uuid4().hex[:12],
                            "model": model, "output_modalities": ["audio"],
                            "audio": {"input": {"transcription": None}}}
            self.send({"type": "session.created", "session": self.session})
        try:
            self._read_loop()
        finally:
            self.closed.set()
            for queue_ in self.lanes.values():
                queue_.put(None)

    def _read_loop(self) -> None:
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        parts: list[Any] = []
        while not self.closed.is_set():
            try:
                data = self.sock.recv(65536)
            except (OSError, ssl.SSLError):
                return
            self.conn.receive_data(data or None)
            for event in self.conn.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    parts.append(event.data)
                    if event.message_finished:
                        message = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                        parts = []
                        self._client_event(message)
                elif isinstance(event, Ping):
                    self._send_raw(self.conn.send(event.response()))
                elif isinstance(event, CloseConnection):
                    try:
                        self._send_raw(self.conn.send(event.response()))
                    except Exception:
                        pass
                    return
            if not data:
                return

    # -- sending -------------------------------------------------------------
    def _send_raw(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def send(self, obj: Any, binary: bool = False) -> None:
        from wsproto.events import BytesMessage, TextMessage

        if self.closed.is_set():
            return
        if isinstance(obj, dict):
            obj = {"type": obj["type"], "event_id" if self.realtime else "sequence_number":
                   ("event_" + uuid.uuid4().hex[:16]) if self.realtime else next(self.seq),
                   **{k: v for k, v in obj.items() if k != "type"}}
            text = json.dumps(obj, separators=(",", ":"))
        else:
            text = obj
        event = BytesMessage(data=text) if binary else TextMessage(data=text)
        try:
            with self.send_lock:
                self.sock.sendall(self.conn.send(event))
        except (OSError, ssl.SSLError, Exception):
            self.closed.set()

    def close(self) -> None:
        from wsproto.events import CloseConnection

        try:
            self._send_raw(self.conn.send(CloseConnection(code=1011, reason="fake server closed")))
        except Exception:
            pass
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- client events -------------------------------------------------------
    def _client_event(self, message: str | bytes) -> None:
        try:
            obj = json.loads(message)
        except (ValueError, RecursionError):
            obj = None
        assert self.received is not None
        with self.state.lock:
            self.received.ws_messages.append(obj if obj is not None else message)
        if not isinstance(obj, dict):
            return self.send({"type": "error", "status": 400, "error": {"type": "invalid_request_error",
                                                                        "code": "invalid_json",
                                                                        "message": "not JSON", "param": None}})
        kind = obj.get("type")
        if self.realtime:
            return self._realtime(kind, obj)
        if kind == "response.create":
            lane = obj.get("stream_id")
            if lane not in self.lanes:
                import queue

                self.lanes[lane] = queue.Queue()
                threading.Thread(target=self._lane, args=(self.lanes[lane],), daemon=True).start()
            self.lanes[lane].put(obj)

    def _lane(self, queue_) -> None:
        while True:
            obj = queue_.get()
            if obj is None:
                return
            try:
                self._response(obj)
            except Exception:
                self.closed.set()
                return

    def _response(self, create: dict) -> None:
        lane = create.get("stream_id")
        meta = create.get("metadata") if isinstance(create.get("metadata"), dict) else {}
        behavior = meta.get("fake_behavior", "")
        delay = float(meta.get("fake_delay") or 0)
        extra = {"stream_id": lane} if lane is not None else {}
        model = create.get("model", "gpt-5")
        served = _served_model(model)
        rid = "resp_" + uuid.uuid4().hex[:24]
        prompt = count_tokens(create.get("input")) + count_tokens(create.get("instructions"))
        chunks = int(meta.get("fake_chunks") or 3)
        usage = _responses_usage(prompt, chunks + 4, reasoning=4)

        def emit(kind: str, payload: dict) -> None:
            if delay:
                time.sleep(delay)
            self.send({"type": kind, **payload, **extra})

        if behavior == "hostile":
            self.send(b"\x00\x01binary\xff", binary=True)
            self.send("this is not JSON {")
            self.send(json.dumps({"type": "response.weird_new_event", "x": 1}))
            self.send(json.dumps([1, 2, 3]))
        if behavior == "error-event":
            return emit("error", {"status": 400, "error": {"type": "invalid_request_error", "code": "bad_thing",
                                                            "message": "fake error event", "param": None}})
        emit("response.created", {"response": _response_object(rid, served, "in_progress", None)})
        if behavior == "stall":
            time.sleep(float(meta.get("fake_stall") or 30))
            return
        if behavior == "close":
            return self.close()
        emit("response.in_progress", {"response": _response_object(rid, served, "in_progress", None)})
        emit("response.output_item.added", {"output_index": 0, "item": {
            "id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}})
        emit("response.content_part.added", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                             "part": {"type": "output_text", "text": "", "annotations": []}})
        if behavior == "huge-frame":
            emit("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                 "delta": "x" * (20 * 1024 * 1024), "logprobs": []})
        for i in range(chunks):
            emit("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                 "delta": f"w{i} ", "logprobs": [], "obfuscation": "zz"})
        part = {"type": "output_text", "text": "done", "annotations": []}
        emit("response.output_text.done", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                            "text": "done"})
        emit("response.content_part.done", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                             "part": part})
        emit("response.output_item.done", {"output_index": 0, "item": {
            "id": "msg_1", "type": "message", "status": "completed", "content": [part], "role": "assistant"}})
        status = {"failed": "failed", "incomplete": "incomplete"}.get(behavior, "completed")
        if behavior == "no-usage":
            return emit("response.completed", {"response": _response_object(rid, served, "completed", None)})
        with self.state.lock:
            assert self.received is not None
            self.received.ws_usages.append(usage)
        emit(f"response.{status}", {"response": _response_object(rid, served, status, usage, text="done")})

    # -- Realtime --------------------------------------------------------------
    def _realtime(self, kind: Any, obj: dict) -> None:
        if kind == "session.update":
            session = obj.get("session") if isinstance(obj.get("session"), dict) else {}
            self.session = {**self.session, **session}
            return self.send({"type": "session.updated", "session": self.session})
        if kind == "input_audio_buffer.commit":
            item = "item_" + uuid.uuid4().hex[:12]
            self.send({"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": None})
            usage = {"type": "tokens", "input_tokens": 25, "input_token_details": {"text_tokens": 0,
                                                                                    "audio_tokens": 25},
                     "output_tokens": 6, "total_tokens": 31}
            with self.state.lock:
                assert self.received is not None
                self.received.ws_usages.append(usage)
            return self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item,
                              "content_index": 0, "transcript": "hello", "usage": usage})
        if kind != "response.create":
            return
        rid = "resp_" + uuid.uuid4().hex[:20]
        response = {"object": "realtime.response", "id": rid, "status": "in_progress", "output": [],
                    "usage": None, "conversation_id": "conv_1", "output_modalities": ["audio"]}
        self.send({"type": "response.created", "response": response})
        self.send({"type": "response.output_item.added", "response_id": rid, "output_index": 0,
                   "item": {"id": "item_a", "type": "message", "role": "assistant", "content": []}})
        for i in range(3):
            self.send({"type": "response.output_audio_transcript.delta", "response_id": rid, "item_id": "item_a",
                       "output_index": 0, "content_index": 0, "delta": f"t{i} "})
        usage = {"total_tokens": 290, "input_tokens": 200, "output_tokens": 90,
                 "input_token_details": {"text_tokens": 120, "audio_tokens": 80, "image_tokens": 0,
                                         "cached_tokens": 64,
                                         "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0}},
                 "output_token_details": {"text_tokens": 30, "audio_tokens": 60}}
        with self.state.lock:
            assert self.received is not None
            self.received.ws_usages.append(usage)
        self.send({"type": "response.done", "response": {**response, "status": "completed", "usage": usage}})


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Benchmarks open dozens of connections at once: the default backlog of 5
    # drops SYNs, and each drop costs the client a 1 s retransmission.
    request_queue_size = 256

    def __init__(self, port: int = 0, tls: bool = True) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.state = FakeState()
        self.tls = tls
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert, key = _self_signed_cert()
            context.load_cert_chain(cert, key)
            # The handshake happens on the connection's own thread (Handler.setup),
            # not in the accept loop, where one slow client would hold up the rest.
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request, client_address) -> None:
        # A client that goes away mid-handshake or mid-request is normal here.
        if isinstance(__import__("sys").exc_info()[1], (ssl.SSLError, ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def start(self) -> FakeServer:
        self.thread = threading.Thread(target=self.serve_forever, name="fake-openai", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


_CERT_CACHE: tuple[str, str] | None = None


def _self_signed_cert() -> tuple[str, str]:
    """A throwaway certificate for api.openai.com (mitmproxy runs ssl_insecure)."""
    global _CERT_CACHE
    if _CERT_CACHE:
        return _CERT_CACHE
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.openai.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.openai.com")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = Path(tempfile.mkdtemp(prefix="fake-openai-"))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    _CERT_CACHE = (str(cert_path), str(key_path))
    return _CERT_CACHE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls", action="store_true")
    args = parser.parse_args()
    server = FakeServer(args.port, tls=args.tls)
    print(f"fake OpenAI on {'https' if args.tls else 'http'}://127.0.0.1:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
