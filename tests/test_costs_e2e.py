"""Costs through the real proxy: one case per (model, usage shape).

Each case sends a real `openai` SDK call through mitmdump to the fake
server, which answers the given usage object in the endpoint's wire format
(`x-fake-usage`), and checks the row's `cost_usd` and `cost_status` against
the figure computed by hand from OpenAI's pricing page (the rates are in
each case's comment; the page is cited in SOURCES). Where genai-prices has
the model, the expected figure is also checked against its `calc_price`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from conftest import start_proxy

PAGE = "https://platform.openai.com/docs/pricing"
SOURCES = {
    "text": (PAGE + "#text-tokens", "2026-03-12"),
    "tiers": (PAGE + "#text-tokens (Flex, Priority tabs)", "2026-11-29"),
    "audio": (PAGE + "#audio-tokens", "2026-03-12"),
    "image": (PAGE + "#image-tokens", "2026-03-12"),
    "image-gen": (PAGE + "#image-generation", "2026-03-12"),
    "transcription": (PAGE + "#transcription-and-speech-generation", "2026-03-12"),
    "embeddings": (PAGE + "#embeddings", "2026-03-12"),
    "tools": (PAGE + "#built-in-tools", "2026-03-12"),
    "moderation": (PAGE + "#moderation", "2026-03-12"),
    "cache-write": (PAGE + "#text-tokens (cache writes)", "2026-11-29"),
}


@dataclass
class Case:
    id: str
    kind: str  # chat | chat_stream | responses | responses_stream | embeddings | completions | transcription
    #            | images | speech | speech_sse | moderation
    model: str
    usage: dict | None  # the wire usage object the fake server answers
    cost: float | None  # expected cost_usd
    source: str  # key of SOURCES
    status: str = "priced"
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    output: list | None = None  # extra Responses output items (hosted tools)
    genai: dict | None = None  # genai-prices Usage for the cross-check (None: it lacks the model or component)
    context: dict | None = None  # genai-prices price_context


def chat_usage(prompt, completion, cached=0, reasoning=0, audio_in=None, audio_out=None, cache_write=None):
    details = {"cached_tokens": cached}
    if audio_in is not None:
        details["audio_tokens"] = audio_in
    if cache_write is not None:
        details["cache_write_tokens"] = cache_write
    out = {"reasoning_tokens": reasoning}
    if audio_out is not None:
        out["audio_tokens"] = audio_out
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": details, "completion_tokens_details": out}


def resp_usage(inp, out, cached=0, reasoning=0, cache_write=None):
    details = {"cached_tokens": cached}
    if cache_write is not None:
        details["cache_write_tokens"] = cache_write
    return {"input_tokens": inp, "input_tokens_details": details, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": inp + out}


def g(**values):  # a genai-prices Usage, as keyword arguments
    return values


CASES = [
    # -- text, Chat Completions and Responses ($ per 1M: input / cached / output) --
    Case("gpt-4o chat cached", "chat", "gpt-4o", chat_usage(1000, 100, cached=400),
         0.003, "text", genai=g(input_tokens=1000, cache_read_tokens=400, output_tokens=100)),  # 2.50/1.25/10
    Case("gpt-4o-mini stream cached", "chat_stream", "gpt-4o-mini", chat_usage(2000, 500, cached=1000),
         0.000525, "text", genai=g(input_tokens=2000, cache_read_tokens=1000, output_tokens=500)),  # .15/.075/.60
    Case("gpt-4.1 chat", "chat", "gpt-4.1", chat_usage(10000, 2000), 0.036, "text",
         genai=g(input_tokens=10000, output_tokens=2000)),  # 2/0.50/8
    Case("gpt-4.1-mini chat cached", "chat", "gpt-4.1-mini", chat_usage(5000, 1000, cached=4000), 0.0024, "text",
         genai=g(input_tokens=5000, cache_read_tokens=4000, output_tokens=1000)),  # .40/.10/1.60
    Case("gpt-4.1-nano chat", "chat", "gpt-4.1-nano", chat_usage(100000, 10000), 0.014, "text",
         genai=g(input_tokens=100000, output_tokens=10000)),  # .10/.025/.40
    Case("gpt-5 chat reasoning", "chat", "gpt-5", chat_usage(1000, 3000, reasoning=2000), 0.03125, "text",
         genai=g(input_tokens=1000, output_tokens=3000)),  # 1.25/.125/10, reasoning is output
    Case("gpt-5-mini responses cached", "responses", "gpt-5-mini", resp_usage(12000, 4000, cached=8000, reasoning=3000),
         0.0092, "text", genai=g(input_tokens=12000, cache_read_tokens=8000, output_tokens=4000)),  # .25/.025/2
    Case("gpt-5-nano responses stream", "responses_stream", "gpt-5-nano", resp_usage(50000, 5000), 0.0045, "text",
         genai=g(input_tokens=50000, output_tokens=5000)),  # .05/.005/.40
    Case("o3 responses", "responses", "o3", resp_usage(2000, 1000, reasoning=800), 0.012, "text",
         genai=g(input_tokens=2000, output_tokens=1000)),  # 2/.50/8
    Case("o4-mini chat", "chat", "o4-mini", chat_usage(1000, 1000), 0.0055, "text",
         genai=g(input_tokens=1000, output_tokens=1000)),  # 1.10/.275/4.40
    Case("o1 chat cached", "chat", "o1", chat_usage(1000, 1000, cached=500), 0.07125, "text",
         genai=g(input_tokens=1000, cache_read_tokens=500, output_tokens=1000)),  # 15/7.50/60
    Case("gpt-3.5-turbo-instruct completions", "completions", "gpt-3.5-turbo-instruct",
         {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}, 0.0017, "text",
         genai=g(input_tokens=1000, output_tokens=100)),  # 1.50/2
    # -- service tiers: as answered; as asked when the answer has none --
    Case("gpt-5 flex answered", "responses", "gpt-5", resp_usage(10000, 3000, cached=2000), 0.020125, "tiers",
         headers={"x-fake-service-tier": "flex"}, params={"service_tier": "flex"},
         genai=g(input_tokens=10000, cache_read_tokens=2000, output_tokens=3000),
         context={"service_tier": "flex"}),  # flex .625/.0625/5
    Case("gpt-5 priority answered", "chat", "gpt-5", chat_usage(10000, 3000, cached=2000), 0.0805, "tiers",
         headers={"x-fake-service-tier": "priority"}, params={"service_tier": "priority"},
         genai=g(input_tokens=10000, cache_read_tokens=2000, output_tokens=3000),
         context={"service_tier": "priority"}),  # priority 2.50/.25/20
    Case("gpt-5-mini priority asked, not answered", "chat", "gpt-5-mini", chat_usage(1000, 1000), 0.00405, "tiers",
         headers={"x-fake-service-tier": ""}, params={"service_tier": "priority"},
         genai=g(input_tokens=1000, output_tokens=1000), context={"service_tier": "priority"}),  # .45/3.60
    Case("gpt-5 fast asked, not answered", "responses_stream", "gpt-5", resp_usage(1000, 1000), 0.0225, "tiers",
         headers={"x-fake-service-tier": ""}, params={"extra_body": {"service_tier": "fast"}},
         genai=g(input_tokens=1000, output_tokens=1000), context={"service_tier": "fast"}),  # 2.50/20
    Case("gpt-4.1 priority answered", "chat", "gpt-4.1", chat_usage(1000, 1000), 0.0175, "tiers",
         headers={"x-fake-service-tier": "priority"}, params={"service_tier": "priority"},
         genai=g(input_tokens=1000, output_tokens=1000), context={"service_tier": "priority"}),  # 3.50/14
    Case("gpt-5 priority asked, default answered", "chat", "gpt-5", chat_usage(1000, 1000), 0.01125, "tiers",
         headers={"x-fake-service-tier": "default"}, params={"service_tier": "priority"},
         genai=g(input_tokens=1000, output_tokens=1000)),  # billed as answered: 1.25/10
    # -- audio tokens ($ per 1M: text in / text out / audio in / audio out) --
    Case("gpt-audio chat audio", "chat", "gpt-audio", chat_usage(1200, 800, audio_in=1000, audio_out=700), 0.0783,
         "audio", genai=g(input_tokens=1200, input_audio_tokens=1000, output_tokens=800,
                          output_audio_tokens=700)),  # 2.50/10/32/64
    Case("gpt-audio-mini chat audio", "chat", "gpt-audio-mini", chat_usage(1200, 800, audio_in=1000, audio_out=700),
         0.02436, "audio", genai=g(input_tokens=1200, input_audio_tokens=1000, output_tokens=800,
                                   output_audio_tokens=700)),  # .60/2.40/10/20
    Case("gpt-4o-audio-preview chat audio", "chat", "gpt-4o-audio-preview",
         chat_usage(1200, 800, audio_in=1000, audio_out=700), 0.0975, "audio"),  # 2.50/10/40/80 (price_table)
    Case("gpt-4o-mini-audio-preview stream audio", "chat_stream", "gpt-4o-mini-audio-preview",
         chat_usage(100, 50, audio_in=80, audio_out=40), 0.001609, "audio"),  # .15/.60/10/20 (price_table)
    Case("gpt-audio text only", "chat", "gpt-audio", chat_usage(1000, 100, audio_in=0, audio_out=0), 0.0035, "audio",
         genai=g(input_tokens=1000, output_tokens=100)),
    # -- transcription and speech --
    Case("gpt-4o-transcribe tokens", "transcription", "gpt-4o-transcribe",
         {"type": "tokens", "input_tokens": 70, "input_token_details": {"text_tokens": 0, "audio_tokens": 70},
          "output_tokens": 12, "total_tokens": 82}, 0.00054, "transcription",
         genai=g(input_tokens=70, input_audio_tokens=70, output_tokens=12)),  # audio 6, text out 10
    Case("gpt-4o-mini-transcribe tokens", "transcription", "gpt-4o-mini-transcribe",
         {"type": "tokens", "input_tokens": 1000, "input_token_details": {"text_tokens": 100, "audio_tokens": 900},
          "output_tokens": 200, "total_tokens": 1200}, 0.003825, "transcription",
         genai=g(input_tokens=1000, input_audio_tokens=900, output_tokens=200)),  # 1.25/5, audio 3
    Case("whisper-1 60 s", "transcription", "whisper-1", {"type": "duration", "seconds": 60}, 0.006,
         "transcription", genai=g(audio_seconds=60)),  # $0.006 / minute
    Case("whisper-1 7 s", "transcription", "whisper-1", {"type": "duration", "seconds": 7}, 0.0007,
         "transcription", genai=g(audio_seconds=7)),
    Case("tts-1 1,000 characters", "speech", "tts-1", None, 0.015, "transcription", params={"input": "a" * 1000},
         genai=g(input_characters=1000)),  # $15 / 1M characters
    Case("tts-1-hd 1,000 characters", "speech", "tts-1-hd", None, 0.03, "transcription",
         params={"input": "b" * 1000}, genai=g(input_characters=1000)),  # $30 / 1M characters
    Case("gpt-4o-mini-tts sse tokens", "speech_sse", "gpt-4o-mini-tts",
         {"input_tokens": 250, "output_tokens": 1000, "total_tokens": 1250}, 0.01215, "transcription",
         genai=g(input_tokens=250, output_tokens=1000)),  # text in .60, audio out 12
    Case("gpt-4o-mini-tts audio bytes", "speech", "gpt-4o-mini-tts", None, None, "transcription",
         status="unknown_price", params={"input": "no usage in the answer"}),  # billed by tokens it never says
    # -- image tokens and per-image models --
    Case("gpt-image-1.5 image out details", "images", "gpt-image-1.5",
         {"input_tokens": 1050, "input_tokens_details": {"text_tokens": 50, "image_tokens": 1000},
          "output_tokens": 4160, "output_tokens_details": {"text_tokens": 0, "image_tokens": 4160},
          "total_tokens": 5210}, 0.14137, "image",
         genai=g(input_tokens=1050, input_image_tokens=1000, output_tokens=4160,
                 output_image_tokens=4160)),  # text 5, image in 8, image out 32
    Case("gpt-image-1.5 no output details", "images", "gpt-image-1.5",
         {"input_tokens": 1050, "input_tokens_details": {"text_tokens": 50, "image_tokens": 1000},
          "output_tokens": 4160, "total_tokens": 5210}, 0.14137, "image",
         genai=g(input_tokens=1050, input_image_tokens=1000, output_tokens=4160, output_image_tokens=4160)),
    Case("gpt-image-1 text prompt", "images", "gpt-image-1",
         {"input_tokens": 50, "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
          "output_tokens": 4160, "total_tokens": 4210}, 0.16665, "image",
         genai=g(input_tokens=50, output_tokens=4160)),  # text 5, image out 40
    Case("gpt-image-1-mini edit", "images", "gpt-image-1-mini",
         {"input_tokens": 540, "input_tokens_details": {"text_tokens": 40, "image_tokens": 500},
          "output_tokens": 1056, "total_tokens": 1596}, 0.009778, "image",
         genai=g(input_tokens=540, input_image_tokens=500, output_tokens=1056)),  # 2, image in 2.50, out 8
    Case("dall-e-3 standard 1024", "images", "dall-e-3", None, 0.04, "image-gen",
         params={"size": "1024x1024", "quality": "standard"}),
    Case("dall-e-3 hd 1792x1024", "images", "dall-e-3", None, 0.12, "image-gen",
         params={"size": "1792x1024", "quality": "hd"}),
    Case("dall-e-2 512 x2", "images", "dall-e-2", None, 0.036, "image-gen", params={"size": "512x512", "n": 2}),
    # -- embeddings, moderation --
    Case("text-embedding-3-small", "embeddings", "text-embedding-3-small",
         {"prompt_tokens": 10000, "total_tokens": 10000}, 0.0002, "embeddings",
         genai=g(input_tokens=10000)),  # .02
    Case("text-embedding-3-large", "embeddings", "text-embedding-3-large",
         {"prompt_tokens": 10000, "total_tokens": 10000}, 0.0013, "embeddings",
         genai=g(input_tokens=10000)),  # .13
    Case("omni-moderation-latest", "moderation", "omni-moderation-latest", None, 0.0, "moderation", status="free"),
    # -- hosted tools, billed per call on top of tokens --
    Case("3 web_search calls gpt-5-mini", "responses", "gpt-5-mini", resp_usage(1000, 500), 0.03125, "tools",
         output=[{"id": f"ws_{i}", "type": "web_search_call", "status": "completed"} for i in range(3)],
         genai=g(input_tokens=1000, output_tokens=500, web_searches=3)),  # $10 / 1k calls
    Case("2 file_search calls gpt-4.1 stream", "responses_stream", "gpt-4.1", resp_usage(1000, 100), 0.0078, "tools",
         output=[{"id": f"fs_{i}", "type": "file_search_call", "status": "completed", "queries": ["q"]}
                 for i in range(2)],
         genai=g(input_tokens=1000, output_tokens=100, storage_searches=2)),  # $2.50 / 1k calls
    Case("code_interpreter 2 calls, 1 container", "responses", "gpt-4.1", resp_usage(1000, 100), 0.0328, "tools",
         output=[{"id": f"ci_{i}", "type": "code_interpreter_call", "status": "completed", "container_id": "cntr_1",
                  "code": "1+1"} for i in range(2)]),  # $0.03 per container
    Case("image_generation call", "responses", "gpt-5", resp_usage(1000, 100), None, "tools", status="unknown_price",
         output=[{"id": "ig_1", "type": "image_generation_call", "status": "completed", "result": "aGk="}]),
    # -- cache writes: their own rate --
    Case("gpt-6-sol cache writes", "responses", "gpt-6-sol", resp_usage(120000, 1000, cached=10000,
                                                                          cache_write=100000),
         0.282, "cache-write", genai=g(input_tokens=120000, cache_read_tokens=10000, cache_write_tokens=100000,
                                       output_tokens=1000)),  # 2 / .20 read / 2.50 write / 10
    Case("gpt-6-sol 100k written", "chat", "gpt-6-sol", chat_usage(100000, 0, cache_write=100000), 0.25,
         "cache-write", genai=g(input_tokens=100000, cache_write_tokens=100000)),  # write 2.50 (input 2)
    Case("gpt-5.6-cyber cache writes chat", "chat", "gpt-5.6-cyber", chat_usage(100000, 0, cache_write=100000),
         1.5625, "cache-write", genai=g(input_tokens=100000, cache_write_tokens=100000)),  # write 15.625
    Case("cache writes without a write price", "chat", "gpt-4.1", chat_usage(100000, 10, cache_write=100000), None,
         "cache-write", status="unknown_price"),
    # -- no price at all --
    Case("unknown model", "chat", "house-model-x", chat_usage(10, 10), None, "text", status="unknown_price"),
]


@pytest.fixture(scope="module")
def priced_proxy(tmp_path_factory, confdir, fake_server):
    tmp = tmp_path_factory.mktemp("costs")
    config = tmp / "config.toml"
    config.write_text('default_pool = "all"\n[pools.all]\nmodels = ["*"]\n')
    proxy = start_proxy(tmp, confdir, fake_server.port, options={"usage_config": str(config)})
    yield proxy
    proxy.stop()


def call(client, case: Case) -> str:
    """Make the case's call; returns the x-request-id of the answer."""
    headers = dict(case.headers)
    if case.usage is not None:
        headers["x-fake-usage"] = json.dumps(case.usage)
    if case.output:
        headers["x-fake-output"] = json.dumps(case.output)
    params = dict(case.params)
    extra = {"extra_headers": headers, **({"extra_body": params.pop("extra_body")} if "extra_body" in params else {})}
    kind = case.kind
    if kind in ("chat", "chat_stream"):
        raw = client.chat.completions.with_raw_response.create(
            model=case.model, messages=[{"role": "user", "content": "hi"}], stream=kind == "chat_stream",
            **params, **extra)
    elif kind in ("responses", "responses_stream"):
        raw = client.responses.with_raw_response.create(model=case.model, input="hi",
                                                        stream=kind == "responses_stream", **params, **extra)
    elif kind == "completions":
        raw = client.completions.with_raw_response.create(model=case.model, prompt="hi", **params, **extra)
    elif kind == "embeddings":
        raw = client.embeddings.with_raw_response.create(model=case.model, input="hi", **extra)
    elif kind == "transcription":
        raw = client.audio.transcriptions.with_raw_response.create(model=case.model, file=("a.wav", b"RIFF0000WAVE"),
                                                                  **extra)
    elif kind == "images":
        raw = client.images.with_raw_response.generate(model=case.model, prompt="a cat", **params, **extra)
    elif kind in ("speech", "speech_sse"):
        params.setdefault("input", "hello there")
        if kind == "speech_sse":
            params["stream_format"] = "sse"
        raw = client.audio.speech.with_raw_response.create(model=case.model, voice="alloy", **params, **extra)
    elif kind == "moderation":
        raw = client.moderations.with_raw_response.create(model=case.model, input="hi", **extra)
    else:
        raise AssertionError(kind)
    parsed = raw.parse()
    if kind.endswith("_stream"):
        assert len(list(parsed)) > 1
    return raw.headers["x-request-id"]


def genai_cost(case: Case) -> float:
    from genai_prices import Usage, calc_price

    result = calc_price(Usage(**case.genai), case.model, provider_id="openai",
                        genai_request_timestamp=datetime.now(timezone.utc), price_context=case.context)
    return float(result.total_price)


def test_at_least_40_cases_each_cited():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    for case in CASES:
        assert case.source in SOURCES
        assert (case.cost is None) == (case.status == "unknown_price")


@pytest.mark.parametrize("case", [c for c in CASES if c.genai is not None], ids=lambda c: c.id)
def test_expected_costs_agree_with_genai_prices(case):
    """The hand-computed figures, against genai-prices where it has the model
    and the component (its own rules, not this project's code)."""
    assert genai_cost(case) == pytest.approx(case.cost, abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cost_through_the_proxy(priced_proxy, case):
    client = priced_proxy.client(max_retries=0)
    request_id = call(client, case)
    rows = priced_proxy.wait_rows(1, "request_id = ?", (request_id,), timeout=20)
    assert len(rows) == 1, priced_proxy.log()[-3000:]
    row = rows[0]
    assert row["outcome"] == "ok", row
    assert row["cost_status"] == case.status, row
    if case.cost is None:
        assert row["cost_usd"] is None
    else:
        assert row["cost_usd"] == pytest.approx(case.cost, abs=1e-10), row
        assert Decimal(str(row["cost_usd"])) == Decimal(str(round(case.cost, 10)))
    if case.kind == "transcription" and case.model == "whisper-1":
        assert row["input_tokens"] is None and row["total_tokens"] is None and row["audio_seconds"] is not None
    if case.usage and "total_tokens" in case.usage:
        assert row["reported_total_tokens"] == case.usage["total_tokens"]
    expected_processing = "standard"
    tier = case.headers.get("x-fake-service-tier")
    asked = case.params.get("service_tier") or case.params.get("extra_body", {}).get("service_tier")
    if tier:
        expected_processing = "standard" if tier == "default" else tier
    elif tier == "" and asked:
        expected_processing = asked
    assert row["processing"] == expected_processing
