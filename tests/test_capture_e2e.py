"""End to end: real mitmdump + addon/usage.py, the real openai SDK, the fake API.

Every test runs in regular proxy mode (HTTPS_PROXY + mitmproxy CA) and in
reverse mode (OPENAI_BASE_URL). One proxy per mode serves the whole module;
each test uses its own API key, so its rows are the ones with that key_id.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import openai
import pytest
from conftest import Proxy, start_proxy

from addon.metering.wire import key_id

_keys = itertools.count()
USED_KEYS: list[str] = []


@pytest.fixture(scope="module", params=["regular", "reverse"])
def mp(request, tmp_path_factory, confdir, fake_server) -> Proxy:
    proxy = start_proxy(tmp_path_factory.mktemp(f"e2e-{request.param}"), confdir, fake_server.port,
                        mode=request.param)
    yield proxy
    proxy.stop()


class Case:
    """One test's key, client, upstream view and rows."""

    def __init__(self, proxy: Proxy, fake) -> None:
        self.key = f"sk-proj-e2e{next(_keys):04d}-{time.time_ns()}Q{len(USED_KEYS):03d}"
        USED_KEYS.append(self.key)
        self.proxy = proxy
        self.fake = fake
        self.kid = key_id(self.key)
        self.client = proxy.client(api_key=self.key, max_retries=0)

    def upstream(self) -> list:
        """What the fake server received with this key, in order."""
        return [r for r in self.fake.state.calls() if r.headers.get("authorization") == f"Bearer {self.key}"]

    def rows(self, count: int, timeout: float = 10) -> list[dict]:
        rows = self.proxy.wait_rows(count, "key_id = ?", (self.kid,), timeout=timeout)
        assert len(rows) == count, (rows, self.proxy.log()[-3000:])
        return rows


@pytest.fixture
def case(mp, fake_server) -> Case:
    return Case(mp, fake_server)


def tokens(row: dict) -> tuple:
    return (row["input_tokens"], row["cached_tokens"], row["output_tokens"], row["reasoning_tokens"],
            row["total_tokens"])


def chat_tokens(usage: dict) -> tuple:
    return (usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"],
            usage["completion_tokens_details"]["reasoning_tokens"], usage["total_tokens"])


def resp_tokens(usage: dict) -> tuple:
    return (usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"], usage["output_tokens"],
            usage["output_tokens_details"]["reasoning_tokens"], usage["total_tokens"])


MESSAGES = [{"role": "user", "content": "Say hello in French, please. Ça va? 😀"}]


# ---------------------------------------------------------------------------
# Non-streaming bodies


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "identity"])
def test_chat_completion_any_encoding(case, encoding):
    reply = case.client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                extra_headers={"x-fake-encoding": encoding})
    assert reply.choices[0].message.content.startswith("hello")
    [row] = case.rows(1)
    [up] = case.upstream()
    assert tokens(row) == chat_tokens(up.usage_sent)
    assert (row["endpoint"], row["method"], row["path"], row["host"]) == (
        "chat.completions", "POST", "/v1/chat/completions", "api.openai.com")
    assert (row["model"], row["requested_model"], row["pool"]) == ("gpt-4o-2024-08-06", "gpt-4o", "premium")
    assert (row["status"], row["outcome"], row["streamed"], row["error"]) == (200, "ok", 0, None)
    assert row["key_hint"] == "sk-…" + case.key[-4:] and row["key_id"] == case.kid
    assert row["response_id"] == reply.id and row["service_tier"] == "default"
    assert row["request_id"].startswith("req_") and row["user_agent"].startswith("OpenAI/Python")
    assert row["ts"].endswith("Z") and row["day"] == row["ts"][:10]
    assert row["latency_ms"] >= row["ttfb_ms"] >= 0


def test_mini_model_goes_to_the_mini_pool(case):
    case.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    [row] = case.rows(1)
    assert (row["model"], row["pool"]) == ("gpt-4o-mini-2024-07-18", "mini")


def test_unknown_model_goes_to_the_default_pool(case):
    case.client.chat.completions.create(model="brand-new-model", messages=MESSAGES)
    [row] = case.rows(1)
    assert (row["model"], row["pool"]) == ("brand-new-model", "premium")


def test_legacy_completion(case):
    case.client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon a time")
    [row] = case.rows(1)
    [up] = case.upstream()
    usage = up.usage_sent
    assert (row["endpoint"], row["outcome"]) == ("completions", "ok")
    assert tokens(row) == (usage["prompt_tokens"], 0, 5, 0, usage["total_tokens"])


def test_responses_body(case):
    reply = case.client.responses.create(model="gpt-5", input="hello there", extra_headers={"x-fake-encoding": "br"})
    [row] = case.rows(1)
    [up] = case.upstream()
    assert tokens(row) == resp_tokens(up.usage_sent)
    assert (row["endpoint"], row["model"], row["pool"], row["response_id"]) == (
        "responses", "gpt-5-2025-08-07", "premium", reply.id)


def test_embeddings(case):
    case.client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    [row] = case.rows(1)
    [up] = case.upstream()
    n = up.usage_sent["prompt_tokens"]
    assert (row["endpoint"], row["pool"], row["outcome"]) == ("embeddings", "other", "ok")
    assert tokens(row) == (n, 0, 0, 0, n)


def test_transcription_billed_by_duration(case):
    case.client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF0000WAVEfmt "))
    [row] = case.rows(1)
    assert (row["endpoint"], row["model"], row["pool"], row["outcome"]) == (
        "audio.transcriptions", "whisper-1", "other", "ok")
    assert row["audio_seconds"] == 7.0 and row["total_tokens"] is None and row["input_tokens"] is None
    assert row["cost_usd"] == pytest.approx(7 / 60 * 0.006) and row["cost_status"] == "priced"


def test_transcription_billed_by_tokens(case):
    case.client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", b"RIFF0000WAVEfmt "))
    [row] = case.rows(1)
    assert (row["model"], row["outcome"], row["audio_seconds"]) == ("gpt-4o-transcribe", "ok", None)
    assert tokens(row) == (70, 0, 12, 0, 82)


def test_image_generation(case):
    case.client.images.generate(model="gpt-image-1", prompt="a cat")
    [row] = case.rows(1)
    assert (row["endpoint"], row["model"], row["pool"]) == ("images.generations", "gpt-image-1", "other")
    assert tokens(row) == (30, 0, 4160, 0, 4190)


def test_call_without_usage_is_recorded(case):
    case.client.moderations.create(model="omni-moderation-latest", input="hi")
    [row] = case.rows(1)
    assert (row["endpoint"], row["outcome"], row["total_tokens"]) == ("moderations", "ok", None)


@pytest.mark.parametrize("status", [400, 429, 500])
def test_upstream_error_is_one_error_row(case, status):
    with pytest.raises(openai.APIStatusError):
        case.client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                            extra_headers={"x-fake-status": str(status)})
    [row] = case.rows(1)
    assert (row["status"], row["outcome"], row["pool"], row["model"]) == (status, "error", "premium", "gpt-4o")
    assert "fake error" in row["error"] and row["total_tokens"] is None


def test_stream_request_answered_with_an_error(case):
    with pytest.raises(openai.RateLimitError):
        case.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                            extra_headers={"x-fake-status": "429"})
    [row] = case.rows(1)
    assert (row["status"], row["outcome"], row["streamed"]) == (429, "error", 1)
    assert "rate_limit_exceeded" in row["error"]


def test_non_json_answer(case):
    raw = case.client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES,
                                                                extra_headers={"x-fake-behavior": "non-json"})
    assert raw.http_response.content == b"<html>upstream oops</html>"
    [row] = case.rows(1)
    assert (row["status"], row["outcome"]) == (200, "no_usage") and row["error"]


# ---------------------------------------------------------------------------
# Streams


def stream_raw(case: Case, **kwargs) -> bytes:
    """The exact bytes the SDK's client received for a streamed request."""
    with case.client.chat.completions.with_streaming_response.create(**kwargs) as response:
        return b"".join(response.iter_bytes())


@pytest.mark.parametrize("behavior", ["", "keepalive", "azure-first-chunk"])
def test_stream_without_include_usage_is_counted_and_looks_untouched(case, behavior):
    body = stream_raw(case, model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={
        "x-fake-behavior": behavior, "x-fake-chunks": "4"})
    [up] = case.upstream()
    # The proxy asked upstream for usage ...
    assert up.json["stream_options"] == {"include_usage": True}
    usage_frames = [f for f in up.frames if b'"usage":{' in f]
    assert len(usage_frames) == 1
    # ... and the client got exactly the bytes upstream sends a client that did not ask:
    # no usage chunk, and no `"usage":null` in the other chunks either.
    assert body == b"".join(up.frames_without_usage)
    assert b'"usage"' not in body
    [row] = case.rows(1)
    assert tokens(row) == chat_tokens(up.usage_sent)
    assert (row["streamed"], row["outcome"], row["model"], row["status"]) == (1, "ok", "gpt-4o-2024-08-06", 200)
    assert row["response_id"].startswith("chatcmpl-")


@pytest.mark.parametrize("newline", ["lf", "crlf"])
def test_stream_split_at_any_byte_and_crlf(case, newline):
    """Upstream cuts every frame into 7-byte pieces (mid-line, mid-UTF-8)."""
    body = stream_raw(case, model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={
        "x-fake-behavior": "dribble", "x-fake-newline": newline})
    [up] = case.upstream()
    expected = b"".join(up.frames_without_usage)
    assert body == (expected.replace(b"\n", b"\r\n") if newline == "crlf" else expected)
    assert (b"\r\n" in body) == (newline == "crlf")
    [row] = case.rows(1)
    assert row["outcome"] == "ok" and tokens(row) == chat_tokens(up.usage_sent)


@pytest.mark.parametrize("newline", ["lf", "crlf"])
def test_responses_stream_split_at_any_byte(case, newline):
    events = list(case.client.responses.create(model="gpt-5", input="héllo 😀", stream=True, extra_headers={
        "x-fake-behavior": "dribble", "x-fake-newline": newline}))
    assert events[-1].type == "response.completed"
    [up] = case.upstream()
    [row] = case.rows(1)
    assert row["outcome"] == "ok" and tokens(row) == resp_tokens(up.usage_sent)


def test_sdk_iteration_sees_only_content_chunks(case):
    chunks = list(case.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": False}))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 "
    [row] = case.rows(1)
    assert (row["pool"], row["outcome"], row["output_tokens"]) == ("mini", "ok", 3)


def test_client_that_asked_for_usage_gets_it(case):
    chunks = list(case.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": True}))
    [up] = case.upstream()
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == up.usage_sent["total_tokens"]
    [row] = case.rows(1)
    assert tokens(row) == chat_tokens(up.usage_sent)


def test_stream_with_several_choices(case):
    chunks = list(case.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, n=2))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    [up] = case.upstream()
    [row] = case.rows(1)
    assert tokens(row) == chat_tokens(up.usage_sent) and row["output_tokens"] == 6


def test_legacy_completion_stream(case):
    chunks = list(case.client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True))
    assert [c.choices[0].text for c in chunks] == ["t0", "t1", "t2", "t3", "t4"]
    [up] = case.upstream()
    [row] = case.rows(1)
    assert (row["endpoint"], row["streamed"], row["total_tokens"]) == (
        "completions", 1, up.usage_sent["total_tokens"])


@pytest.mark.parametrize("terminal", ["completed", "incomplete", "failed"])
def test_responses_stream(case, terminal):
    events = list(case.client.responses.create(model="gpt-5", input="hi", stream=True,
                                               extra_headers={"x-fake-terminal": terminal}))
    assert events[-1].type == f"response.{terminal}"
    [up] = case.upstream()
    assert "stream_options" not in up.json  # nothing is injected into Responses requests
    [row] = case.rows(1)
    assert tokens(row) == resp_tokens(up.usage_sent)
    assert (row["endpoint"], row["streamed"], row["model"], row["response_id"]) == (
        "responses", 1, "gpt-5-2025-08-07", events[-1].response.id)
    assert row["outcome"] == ("ok" if terminal != "failed" else "error")


def test_background_response_counted_once_when_finished(case):
    queued = case.client.responses.create(model="gpt-5", input="think hard", background=True,
                                          extra_headers={"x-fake-polls": "1"})
    assert queued.status == "queued"
    polls = [case.client.responses.retrieve(queued.id).status for _ in range(3)]
    assert polls == ["in_progress", "completed", "completed"]
    rows = case.rows(4)
    assert [r["endpoint"] for r in rows] == ["responses", "responses.get", "responses.get", "responses.get"]
    assert {r["response_id"] for r in rows} == {queued.id}
    counted = [r for r in rows if r["total_tokens"]]
    assert len(counted) == 1 and counted[0] is rows[2]
    assert tokens(counted[0]) == (50, 0, 20, 8, 70)
    assert all(r["outcome"] == "ok" and r["pool"] == "premium" for r in rows)


def test_stream_without_usage_is_a_no_usage_row(case):
    list(case.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                             extra_headers={"x-fake-behavior": "no-usage"}))
    [row] = case.rows(1)
    assert (row["outcome"], row["status"], row["streamed"], row["total_tokens"]) == (
        "no_usage", 200, 1, None)
    assert row["model"] == "gpt-4o-2024-08-06" and row["error"]


def test_responses_stream_without_terminal_event(case):
    list(case.client.responses.create(model="gpt-5", input="hi", stream=True,
                                      extra_headers={"x-fake-behavior": "no-usage"}))
    [row] = case.rows(1)
    assert (row["outcome"], row["total_tokens"], row["model"]) == ("no_usage", None, "gpt-5-2025-08-07")


def test_error_event_mid_stream(case):
    with pytest.raises(openai.APIError):
        list(case.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                 extra_headers={"x-fake-behavior": "error-event"}))
    [row] = case.rows(1)
    assert (row["outcome"], row["status"]) == ("error", 200)
    assert "server had an error" in row["error"]


def test_client_abort_mid_stream(case):
    stream = case.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                 extra_headers={"x-fake-delay": "0.3", "x-fake-chunks": "20"})
    first = next(iter(stream))
    assert first.choices
    stream.close()
    [row] = case.rows(1, timeout=15)
    assert (row["outcome"], row["streamed"], row["model"]) == ("aborted", 1, "gpt-4o-2024-08-06")
    assert row["total_tokens"] is None and row["error"]


def test_first_chunk_is_not_held_back(case):
    """400 ms between events: the first chunk must reach the client long
    before the stream ends (measured against the stream's own duration)."""
    started = time.monotonic()
    arrivals = []
    with case.client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"x-fake-delay": "0.4", "x-fake-chunks": "6"}
    ) as response:
        received = b""
        for piece in response.iter_bytes():
            arrivals.append(time.monotonic() - started)
            received += piece
    total = time.monotonic() - started
    # 7 generated frames after the first, 400 ms apart (the usage chunk and
    # [DONE] come with the last): the stream lasts >= 2.8 s.
    assert total > 2.5
    assert arrivals[0] < total / 4, (arrivals, total)
    assert len(arrivals) >= 5  # delivered progressively, not in one piece at the end
    [up] = case.upstream()
    assert received == b"".join(up.frames_without_usage)
    [row] = case.rows(1)
    assert row["outcome"] == "ok" and tokens(row) == chat_tokens(up.usage_sent)
    assert row["ttfb_ms"] < row["latency_ms"] / 4


# ---------------------------------------------------------------------------
# Hosts and secrecy


def test_unmetered_host_passes_untouched(mp, fake_server):
    if mp.mode != "regular":
        pytest.skip("reverse mode has a single upstream")
    case = Case(mp, fake_server)
    # Tunnelled without interception: the client sees the server's own
    # (self-signed) certificate, not one from the mitmproxy CA.
    import openai

    http_client = openai.DefaultHttpxClient(proxy=mp.url, verify=False)
    client = openai.OpenAI(api_key=case.key, base_url="https://eu.api.openai.com/v1", max_retries=0,
                           http_client=http_client)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert chunks  # forwarded
    [up] = case.upstream()
    assert "stream_options" not in up.json  # not touched
    time.sleep(0.5)
    assert mp.rows("key_id = ?", (case.kid,)) == []


def test_wildcard_usage_hosts(make_proxy, fake_server):
    proxy = make_proxy(mode="regular", options={"usage_hosts": "*.openai.com"})
    case = Case(proxy, fake_server)
    client = proxy.client(api_key=case.key, base_url="https://eu.api.openai.com/v1", max_retries=0)
    client.embeddings.create(model="text-embedding-3-small", input="x")
    [row] = case.rows(1)
    assert row["host"] == "eu.api.openai.com"


def test_keys_are_never_written(mp):
    """Runs last in each mode: no key used so far is in the database or the log."""
    time.sleep(0.3)
    blobs = [Path(mp.db).read_bytes()]
    for suffix in ("-wal", "-shm"):
        extra = Path(str(mp.db) + suffix)
        if extra.exists():
            blobs.append(extra.read_bytes())
    log = mp.log()
    assert USED_KEYS
    for key in USED_KEYS:
        assert all(key.encode() not in blob for blob in blobs)
        assert key not in log
    # Rows exist, with hash and hint only.
    rows = mp.rows("key_hint is not null")
    assert rows and all(len(r["key_id"]) == 12 and r["key_hint"].startswith("sk-…") for r in rows)
