"""Costs of every billed dimension: usage shapes, cost_status, overrides per
component and tier, batch, robustness, the override shadow warning, and the
migration of a database written before these columns existed."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT

from addon import config as config_mod
from addon.metering import wire
from addon.metering.pricing import Pricer, shadowed_snapshots
from addon.store import schema

TS = "2026-11-29T10:00:00.000Z"


def row(model: str, **values) -> dict:
    return {"ts": TS, "model": model, "outcome": "ok", **values}


def columns(usage: wire.Usage) -> dict:
    return {k: v for k, v in usage.as_columns().items() if v is not None}


# -- parsing ----------------------------------------------------------------------
def test_chat_audio_and_cache_write_parts():
    usage = wire.parse_usage({
        "prompt_tokens": 1200, "completion_tokens": 800, "total_tokens": 2001,
        "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 1000, "cache_write_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 700}})
    assert columns(usage) == {
        "input_tokens": 1200, "cached_tokens": 100, "output_tokens": 800, "reasoning_tokens": 0,
        "total_tokens": 2000, "reported_total_tokens": 2001, "audio_input_tokens": 1000,
        "audio_output_tokens": 700, "cache_write_tokens": 50}


def test_realtime_shape_splits_audio_and_cached_audio():
    usage = wire.parse_usage({
        "total_tokens": 1500, "input_tokens": 1000, "output_tokens": 500,
        "input_token_details": {"text_tokens": 400, "audio_tokens": 600, "cached_tokens": 300,
                                "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 200}},
        "output_token_details": {"text_tokens": 100, "audio_tokens": 400}})
    assert columns(usage) == {
        "input_tokens": 1000, "cached_tokens": 300, "output_tokens": 500, "reasoning_tokens": 0,
        "total_tokens": 1500, "reported_total_tokens": 1500, "audio_input_tokens": 600,
        "cached_audio_tokens": 200, "audio_output_tokens": 400}
    # gpt-realtime-mini: text .60 / cached .06, audio 10 / cached audio .30, out text 2.40 / audio 20.
    cost = Pricer().cost(row("gpt-realtime-mini", **usage.as_columns()))
    expected = (300 * 0.6 + 100 * 0.06 + 400 * 10 + 200 * 0.3 + 100 * 2.4 + 400 * 20) / 1e6
    assert cost == pytest.approx(expected, abs=1e-12)


def test_image_model_parts_and_tool_calls():
    facts = wire.facts_from_body({
        "id": "resp_1", "object": "response", "status": "completed", "model": "gpt-5-mini",
        "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
        "output": [{"type": "web_search_call"}, {"type": "web_search_call"}, {"type": "message"},
                   {"type": "code_interpreter_call", "container_id": "c1"},
                   {"type": "code_interpreter_call", "container_id": "c1"},
                   {"type": "code_interpreter_call", "container_id": "c2"}, "junk"]})
    assert facts.usage.tool_calls == {"web_search": 2, "code_interpreter": 3, "container": 2}
    assert json.loads(facts.usage.as_columns()["tool_calls"]) == {"web_search": 2, "code_interpreter": 3,
                                                                   "container": 2}
    image = wire.parse_usage({"input_tokens": 1050, "input_tokens_details": {"text_tokens": 50, "image_tokens": 1000},
                               "output_tokens": 4160, "total_tokens": 5210})
    assert image.image_input_tokens == 1000 and image.image_output_tokens is None
    completed = wire.complete_usage("images.generations", image, wire.RequestFacts(), None)
    assert completed.image_output_tokens == 4160


def test_duration_rows_have_no_tokens():
    usage = wire.parse_usage({"type": "duration", "seconds": 60})
    cols = usage.as_columns()
    assert cols["audio_seconds"] == 60.0
    assert all(cols[c] is None for c in ("input_tokens", "output_tokens", "total_tokens", "cached_tokens"))


def test_speech_and_dall_e_complete_usage():
    request = wire.facts_from_request({"model": "tts-1", "voice": "alloy", "input": "x" * 1000})
    assert request.characters == 1000
    assert wire.complete_usage("audio.speech", None, request, None).characters == 1000
    facts = wire.facts_from_body({"created": 1, "data": [{"url": "u"}, {"url": "v"}]})
    usage = wire.complete_usage("images.generations", None, wire.RequestFacts(), facts)
    assert usage.images == 2 and usage.input_tokens is None


def test_processing_and_billed_tier():
    assert wire.processing_of(None) == "standard" and wire.processing_of("default") == "standard"
    assert wire.processing_of("priority") == "priority"
    assert wire.billed_service_tier(None, "priority") == "priority"
    assert wire.billed_service_tier("default", "priority") == "default"
    assert wire.billed_service_tier("auto", "flex") == "flex"


# -- pricing ----------------------------------------------------------------------
def test_cost_status_values():
    pricer = Pricer()
    assert pricer.quote(row("gpt-4o", input_tokens=10, output_tokens=1))[1] == "priced"
    assert pricer.quote(row("gpt-4o", outcome="blocked")) == (None, "no_usage")
    assert pricer.quote(row("omni-moderation-latest")) == (0.0, "free")
    assert pricer.quote(row("omni-moderation-latest", outcome="error")) == (None, "no_usage")
    assert pricer.quote(row("mystery-9", input_tokens=1, output_tokens=1)) == (None, "unknown_price")


def test_a_used_component_without_price_makes_the_cost_unknown():
    pricer = Pricer()
    # gpt-5 has no audio rate: the whole row is unknown, never priced as text.
    assert pricer.quote(row("gpt-5", input_tokens=100, audio_input_tokens=50, output_tokens=1)) == \
        (None, "unknown_price")
    # A component that is 0 does not matter.
    assert pricer.quote(row("gpt-5", input_tokens=100, audio_input_tokens=0, output_tokens=1))[1] == "priced"
    assert pricer.quote(row("gpt-5", input_tokens=1, output_tokens=1,
                            tool_calls='{"image_generation": 1}')) == (None, "unknown_price")


def test_batch_is_half_price():
    pricer = Pricer()
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000}
    # gpt-5 batch (genai-prices variant): .625 + 5 (standard 1.25 + 10).
    assert pricer.cost(row("gpt-5", processing="batch", **usage)) == pytest.approx(5.625)
    # Before genai-prices knows batch prices (2026-10-14), OpenAI's 50 % rule.
    assert pricer.cost(row("gpt-5", processing="batch", **{**usage, "ts": "2026-01-10T00:00:00.000Z"})) == \
        pytest.approx(5.625)
    # A model without a batch variant: 50 % of its standard price (gpt-4.5-preview: 75 / 150).
    assert pricer.cost(row("gpt-4.5-preview", processing="batch", **usage)) == pytest.approx(112.5)


def test_unknown_service_tier_is_unknown_not_standard():
    assert Pricer().quote(row("gpt-4o", input_tokens=10, output_tokens=1, service_tier="flex")) == \
        (None, "unknown_price")


def test_overrides_per_component_and_tier():
    prices = config_mod.parse('''
[pools.a]
models = ["*"]
[prices."gpt-audio"]
audio_input = 10
[prices."gpt-4o"]
input = 1
[prices."gpt-4o".flex]
input = 0.5
output = 2
[prices."gpt-4o".batch]
output = 3
[prices."my-tts"]
characters = 20
[prices."gpt-5"]
image_generation = 40
''').prices
    pricer = Pricer(prices)
    # Only audio input overridden: the rest from the catalogue (2.50 / 10 / 64).
    assert pricer.cost(row("gpt-audio", input_tokens=1200, audio_input_tokens=1000, output_tokens=800,
                           audio_output_tokens=700)) == \
        pytest.approx((200 * 2.5 + 1000 * 10 + 100 * 10 + 700 * 64) / 1e6)
    # Base override: input 1, output and cached from the catalogue (10, 1.25).
    assert pricer.cost(row("gpt-4o-2024-08-06", input_tokens=1000, cached_tokens=200, output_tokens=100)) == \
        pytest.approx((800 * 1 + 200 * 1.25 + 100 * 10) / 1e6)
    # A tier the catalogue lacks for gpt-4o, given by the override.
    assert pricer.cost(row("gpt-4o", input_tokens=1000, output_tokens=100, service_tier="flex")) == \
        pytest.approx((1000 * 0.5 + 100 * 2) / 1e6)
    # Batch: the override's batch output, the catalogue's batch input (1.25).
    assert pricer.cost(row("gpt-4o", input_tokens=1000, output_tokens=100, processing="batch")) == \
        pytest.approx((1000 * 1.25 + 100 * 3) / 1e6)
    assert pricer.quote(row("my-tts", characters=1000)) == (pytest.approx(0.02), "priced")
    # A batch override on a model without batch prices: the rest at 50 % of the base (my-model: 4 / 8).
    batch = Pricer({"my-model": config_mod.Price(input=4, output=8, tiers={"batch": config_mod.Price(output=1)})})
    assert batch.cost(row("my-model", input_tokens=1000, output_tokens=1000, processing="batch")) == \
        pytest.approx((1000 * 2 + 1000 * 1) / 1e6)
    assert pricer.cost(row("gpt-5", input_tokens=0, output_tokens=0, tool_calls='{"image_generation": 2}')) == \
        pytest.approx(0.08)


def test_one_error_never_disables_a_model(caplog):
    pricer = Pricer()
    bad = row("gpt-4o", input_tokens=10, cached_tokens=50, output_tokens=1)  # cached > input
    with caplog.at_level(logging.WARNING, logger="addon.metering.pricing"):
        assert pricer.quote(bad) == (None, "unknown_price")
        assert pricer.quote(row("gpt-4o", input_tokens=10, tool_calls="{not json")) == (None, "unknown_price")
    assert "usage parts exceed" in caplog.text and "pricing failed" in caplog.text
    assert pricer.quote(row("gpt-4o", input_tokens=1000, output_tokens=0)) == (0.0025, "priced")


def test_override_shadowing_a_snapshot_is_warned():
    prices = {"gpt-4o": config_mod.Price(input=2.5, output=10), "house-*": config_mod.Price(input=1, output=1)}
    messages = shadowed_snapshots(prices)
    assert len(messages) == 1 and "gpt-4o-2024-05-13" in messages[0] and "gpt-4o-mini" not in messages[0]
    assert "gpt-4o-2024-08-06" not in messages[0]  # the same catalogue entry as gpt-4o
    exact = {**prices, "gpt-4o-2024-05-13": config_mod.Price(input=5, output=15)}
    assert shadowed_snapshots(exact) == []


def test_proxy_warns_about_shadowing_override(make_proxy, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[pools.all]\nmodels = ["*"]\n[prices."gpt-4o"]\ninput = 2\noutput = 8\n')
    proxy = make_proxy(options={"usage_config": str(config)})
    proxy.client().chat.completions.create(model="gpt-4o-2024-05-13", messages=[{"role": "user", "content": "x"}])
    assert proxy.wait_rows(1)[0]["cost_status"] == "priced"
    assert "also covers gpt-4o-2024-05-13" in proxy.log()


# -- a database written before these columns ----------------------------------------
OLD_REQUESTS = """CREATE TABLE "requests" (
   "id" INTEGER PRIMARY KEY, "ts" TEXT, "day" TEXT, "host" TEXT, "method" TEXT, "path" TEXT, "endpoint" TEXT,
   "model" TEXT, "pool" TEXT, "status" INTEGER, "outcome" TEXT, "streamed" INTEGER, "input_tokens" INTEGER,
   "cached_tokens" INTEGER, "output_tokens" INTEGER, "reasoning_tokens" INTEGER, "total_tokens" INTEGER,
   "cost_usd" REAL, "latency_ms" REAL, "ttfb_ms" REAL, "key_id" TEXT, "key_hint" TEXT, "project" TEXT,
   "request_id" TEXT, "service_tier" TEXT, "user_agent" TEXT, "error" TEXT, "response_id" TEXT,
   "audio_seconds" REAL, "label" TEXT, "requested_model" TEXT)"""


def test_migrates_a_database_of_the_previous_version(make_proxy, tmp_path):
    """The schema and rows as the version before this one wrote them (whisper
    with 0 tokens, moderation with NULL cost): the proxy adds the columns,
    `reprice` fills cost_status and fixes the costs."""
    db_path = tmp_path / "usage.db"
    conn = sqlite3.connect(db_path)
    conn.execute(OLD_REQUESTS)
    old = [
        ("2026-11-20T10:00:00.000Z", "chat.completions", "gpt-4o-2024-08-06", "ok", 1000, 400, 100, 0, 1100, 0.003,
         "default", None),
        ("2026-11-20T10:01:00.000Z", "audio.transcriptions", "whisper-1", "ok", 0, 0, 0, 0, 0, 0.0, None, 60.0),
        ("2026-11-20T10:02:00.000Z", "moderations", "omni-moderation-latest", "ok", None, None, None, None, None,
         None, None, None),
        ("2026-11-20T10:03:00.000Z", "chat.completions", "gpt-4o", "blocked", None, None, None, None, None, None,
         None, None),
    ]
    conn.executemany(
        "INSERT INTO requests (ts, endpoint, model, outcome, input_tokens, cached_tokens, output_tokens,"
        " reasoning_tokens, total_tokens, cost_usd, service_tier, audio_seconds) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        old)
    conn.commit()
    conn.close()

    proxy = make_proxy(db=db_path)
    proxy.client().chat.completions.create(model="gpt-audio", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"x-fake-usage": json.dumps({
                                               "prompt_tokens": 1200, "completion_tokens": 800, "total_tokens": 2000,
                                               "prompt_tokens_details": {"audio_tokens": 1000},
                                               "completion_tokens_details": {"audio_tokens": 700}})})
    rows = proxy.wait_rows(5)
    assert len(rows) == 5
    new = rows[-1]
    assert (new["audio_input_tokens"], new["audio_output_tokens"], new["reported_total_tokens"]) == (1000, 700, 2000)
    assert new["cost_usd"] == pytest.approx(0.0783) and new["cost_status"] == "priced"
    assert new["processing"] == "standard"
    assert [r["cost_status"] for r in rows[:4]] == [None] * 4  # old rows untouched until reprice
    proxy.stop()

    result = subprocess.run([sys.executable, "-m", "addon", "reprice", "--db", str(db_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(db_path)
    got = conn.execute("SELECT model, cost_usd, cost_status FROM requests ORDER BY id").fetchall()
    names = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    conn.close()
    assert set(schema.REQUEST_COLUMNS) <= names
    assert got[0] == ("gpt-4o-2024-08-06", pytest.approx(0.003), "priced")
    # whisper-1 written with 0 tokens by the old version: priced by its seconds, not $0.
    assert got[1] == ("whisper-1", pytest.approx(0.006), "priced")
    assert got[2] == ("omni-moderation-latest", 0.0, "free")
    assert got[3] == ("gpt-4o", None, "no_usage")
    assert got[4] == ("gpt-audio", pytest.approx(0.0783), "priced")
    assert "5 rows" in result.stdout and "1 free" in result.stdout and "1 without usage" in result.stdout
