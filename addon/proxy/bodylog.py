"""Opt-in body log for debugging: `--set usage_body_log=bodies.ndjson`.

One JSON line per metered exchange: request and response with headers and
bodies (UTF-8 text, else base64), credentials and cookies redacted. The
hooks only copy references into a bounded queue; a thread decodes, redacts
and writes. When the queue is full the entry is dropped and counted: the
log never slows traffic down. Streamed responses are not buffered: their
entry says `"streamed": true` and has headers only.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from addon.metering.bounded import MAX_DECODED_BODY, UnknownEncoding, decoded_pieces
from addon.metering.redact import redact_headers, redact_text, redact_url
from addon.proxy.meter import UsageMeter
from addon.store.schema import open_private
from addon.worker import FailureLog, QueueWorker

log = logging.getLogger(__name__)

MAX_ENTRIES = 1000
MAX_QUEUED_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Message:
    """What is needed to log one request or response, taken on the event loop."""

    headers: list[tuple[str, str]]
    raw: bytes | None
    encoding: str | None
    streamed: bool
    first_line: dict[str, Any]


@dataclass(slots=True)
class Entry:
    ts: float
    flow_id: str
    request: Message
    response: Message | None
    error: str | None

    @property
    def size(self) -> int:
        return sum(len(m.raw or b"") for m in (self.request, self.response) if m is not None)


def body_fields(raw: bytes | None, encoding: str | None, limit: int = MAX_DECODED_BODY) -> dict[str, Any]:
    """Decoded body as redacted text when it is UTF-8, else base64; decoded within `limit`."""
    if raw is None:
        return {}
    data = raw
    if encoding and encoding.strip().lower() not in ("", "identity"):
        try:
            out, size = [], 0
            for piece in decoded_pieces(raw, encoding):
                size += len(piece)
                if size > limit:
                    return {"body_omitted": f"decodes to more than {limit >> 20} MB", "content_encoding": encoding}
                out.append(piece)
            data = b"".join(out)
        except UnknownEncoding:
            return {"body_base64": base64.b64encode(raw).decode(), "content_encoding": encoding}
        except Exception:  # corrupt: logged as it came
            return {"body_base64": base64.b64encode(raw).decode(), "content_encoding": encoding}
    try:
        return {"body": redact_text(data.decode("utf-8"))}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(data).decode()}


def render(entry: Entry) -> str:
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry.ts)) + f".{int(entry.ts * 1000) % 1000:03d}Z",
        "flow_id": entry.flow_id,
    }
    for name, message in (("request", entry.request), ("response", entry.response)):
        if message is None:
            continue
        part: dict[str, Any] = dict(message.first_line)
        if "url" in part:
            part["url"] = redact_url(part["url"])
        part["headers"] = redact_headers(message.headers)
        if message.streamed:
            part["streamed"] = True  # body passed through unbuffered: not logged
        else:
            part.update(body_fields(message.raw, message.encoding))
        out[name] = part
    if entry.error:
        out["error"] = entry.error
    return json.dumps(out, ensure_ascii=False)


def _message(msg, first_line: dict[str, Any]) -> Message:
    streamed = bool(msg.stream)
    return Message(
        headers=[(k, v) for k, v in msg.headers.items(multi=True)],
        raw=None if streamed else msg.raw_content,
        encoding=msg.headers.get("content-encoding"),
        streamed=streamed,
        first_line=first_line,
    )


class BodyLogWriter(QueueWorker[Entry]):
    """The thread that owns the file."""

    def __init__(self, path: str, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.path = path
        self.file = open_private(path)  # fail now (OptionsError), not later; 0600: it holds bodies
        super().__init__("usage-body-log", maxsize=max_entries, failures=FailureLog(
            f"usage_body_log: writing {path}", logger=log))
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.lock = threading.Lock()
        self.written = 0
        self.dropped = 0
        self.start()

    def put(self, entry: Entry) -> None:
        size = entry.size
        with self.lock:
            full = self.queued_bytes + size > self.max_bytes and self.queued_bytes > 0
            if not full:
                try:
                    super().put(entry)
                    self.queued_bytes += size
                    return
                except queue.Full:
                    pass
            self.dropped += 1
            dropped = self.dropped
        if dropped == 1 or dropped % 100 == 0:
            log.warning("usage_body_log: writer behind, dropped %d entries so far (traffic is not affected)", dropped)

    def close(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        if self.dropped:
            log.warning("usage_body_log: %d entries were dropped in total", self.dropped)

    def handle(self, batch: list[Entry]) -> None:
        with self.lock:
            self.queued_bytes -= sum(entry.size for entry in batch)
        for entry in batch:
            try:
                self.file.write(render(entry) + "\n")
                self.written += 1
            except Exception:
                log.exception("usage_body_log: writing %s failed", self.path)
        self.file.flush()

    def finish(self) -> None:
        self.file.close()


class BodyLog:
    """Writes request/response pairs of metered hosts to `usage_body_log`."""

    def __init__(self, usage_meter: UsageMeter | None = None) -> None:
        self.meter = usage_meter  # for metered_destination(); None: every host
        self.writer: BodyLogWriter | None = None
        self.path = ""

    def load(self, loader) -> None:
        loader.add_option(
            "usage_body_log", str, "",
            "Debugging: append request/response bodies of metered calls as JSON lines to this file "
            "(credentials and cookies redacted). Off when empty.",
        )

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx, exceptions

        if "usage_body_log" not in updated:
            return
        path = ctx.options.usage_body_log
        if path == self.path:
            return
        old, self.writer = self.writer, None
        if path:
            try:
                self.writer = BodyLogWriter(path)
            except OSError as exc:
                raise exceptions.OptionsError(f"usage_body_log: cannot open {path}: {exc.strerror or exc}") from None
            log.warning("usage_body_log: writing request and response bodies to %s (debugging only)", path)
        self.path = path
        if old is not None:
            old.close()

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def response(self, flow) -> None:
        self._log(flow)

    def error(self, flow) -> None:
        self._log(flow)

    def _log(self, flow) -> None:
        if self.writer is None or flow.metadata.get("usage_body_logged"):
            return
        req = flow.request
        if self.meter is not None and self.meter.metered_destination(flow) is None:
            return
        request = _message(req, {"method": req.method, "url": req.pretty_url, "http_version": req.http_version})
        response = None
        if flow.response is not None:
            res = flow.response
            first = {"status": res.status_code, "reason": res.reason, "http_version": res.http_version}
            response = _message(res, first)
        error = flow.error.msg if flow.error is not None else None
        flow.metadata["usage_body_logged"] = True  # response and error hooks can both fire
        self.writer.put(Entry(time.time(), flow.id, request, response, error))
