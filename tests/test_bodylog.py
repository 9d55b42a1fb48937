"""The opt-in body log: NDJSON, redacted, off the event loop, streams not buffered."""

from __future__ import annotations

import base64
import json
import time

import openai
from conftest import FAKE_KEY

from addon.metering import redact
from addon.proxy import bodylog


def read_log(path, count: int, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def test_off_by_default(proxy, tmp_path):
    # `proxy` runs without the option: nothing is written anywhere.
    assert "usage_body_log" not in proxy.log()
    client = proxy.client()
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "plain"}])
    assert not list(tmp_path.glob("*.ndjson"))


def test_body_log_entries(make_proxy, tmp_path, fake_server):
    path = tmp_path / "bodies.ndjson"
    proxy = make_proxy(options={"usage_body_log": str(path)})
    client = proxy.client(default_headers={"Cookie": "session=secret-cookie", "x-api-key": "other-secret"})
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "héllo body"}])
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "s"}], stream=True,
                                            extra_headers={"x-fake-chunks": "4"})
    assert len(list(stream)) > 4
    client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF\x00\xff\xfe binary"))
    entries = read_log(path, 3)
    assert len(entries) == 3
    text = path.read_text()
    for secret in (FAKE_KEY, "secret-cookie", "other-secret"):
        assert secret not in text

    plain, streamed, upload = entries
    headers = {name.lower(): value for name, value in plain["request"]["headers"]}
    assert headers["authorization"] == headers["cookie"] == headers["x-api-key"] == "[redacted]"
    assert plain["request"]["method"] == "POST"
    assert plain["request"]["url"] == "https://api.openai.com/v1/chat/completions"
    assert json.loads(plain["request"]["body"])["messages"][0]["content"] == "héllo body"
    # The fake server gzips JSON; the log holds the decoded text.
    assert plain["response"]["status"] == 200
    assert json.loads(plain["response"]["body"])["id"] == answer.id

    assert streamed["response"]["streamed"] is True
    assert "body" not in streamed["response"] and "body_base64" not in streamed["response"]
    assert dict(streamed["response"]["headers"])["content-type"].startswith("text/event-stream")

    # A multipart upload with binary bytes is not UTF-8: base64.
    raw = base64.b64decode(upload["request"]["body_base64"])
    assert b"RIFF\x00\xff\xfe binary" in raw
    assert json.loads(upload["response"]["body"])["text"] == "hello world"


def test_errors_are_logged(make_proxy, tmp_path):
    path = tmp_path / "bodies.ndjson"
    proxy = make_proxy(options={"usage_body_log": str(path)})
    client = proxy.client(max_retries=0)
    try:
        for _ in client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}],
                                                stream=True, extra_headers={"x-fake-behavior": "reset-mid-stream",
                                                                            "x-fake-chunks": "6"}):
            pass
    except openai.APIError:
        pass
    (entry, *_) = read_log(path, 1)
    assert entry["response"]["streamed"] is True
    assert entry["error"]


def test_unwritable_path_stops_startup(tmp_path, confdir, fake_server):
    from conftest import start_proxy

    bad = tmp_path / "missing-dir" / "bodies.ndjson"
    try:
        proxy = start_proxy(tmp_path, confdir, fake_server.port, options={"usage_body_log": str(bad)})
        proxy.proc.wait(10)
        log = proxy.log()
    except RuntimeError as exc:
        log = str(exc)
    assert "usage_body_log: cannot open" in log and "missing-dir" in log


def test_redaction_helpers():
    headers = [("Authorization", "Bearer sk-x"), ("Proxy-Authorization", "Basic x"), ("api-key", "k"),
               ("X-Api-Key", "k"), ("Cookie", "a=b"), ("Set-Cookie", "c=d"), ("Content-Type", "application/json")]
    redacted = redact.redact_headers(headers)
    assert [value for _, value in redacted] == ["[redacted]"] * 6 + ["application/json"]
    url = redact.redact_url("https://x.openai.azure.com/openai/deployments/d/chat?api-version=1&api-key=secret")
    assert "secret" not in url and "api-version=1" in url
    assert bodylog.body_fields(b"\xff\xfe", None) == {"body_base64": "//4="}
    assert bodylog.body_fields("é".encode(), "identity") == {"body": "é"}


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    # A writer whose thread is stuck on a slow file: put() must never wait.
    writer = bodylog.BodyLogWriter(str(tmp_path / "b.ndjson"), max_entries=2)
    release = __import__("threading").Event()
    original = writer.file.write

    def slow_write(text):
        release.wait(10)
        return original(text)

    writer.file.write = slow_write
    message = bodylog.Message([("a", "b")], b"{}", None, False, {"method": "GET", "url": "https://h/p"})
    for _ in range(10):
        writer.put(bodylog.Entry(time.time(), "f", message, None, None))
    # At most 3 in the thread's batch (the first, and what was queued when it took it), 2 queued, the rest dropped.
    assert writer.dropped >= 5
    release.set()
    writer.close()
    lines = (tmp_path / "b.ndjson").read_text().splitlines()
    assert len(lines) == 10 - writer.dropped
