"""Costs: genai-prices catalogue, config overrides, unknown models, reprice."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from addon import config as config_mod
from addon.metering.pricing import Pricer
from addon.store import schema
from addon.tools.reprice import reprice

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def row(model: str, **tokens) -> dict:
    base = {"ts": "2026-11-22T10:00:00.000Z", "model": model}
    base.update(tokens)
    return base


def test_cached_input_is_priced_as_cached():
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output per million.
    cost = Pricer().cost(row("gpt-4o-2024-08-06", input_tokens=1000, cached_tokens=400, output_tokens=100))
    assert cost == pytest.approx((600 * 2.5 + 400 * 1.25 + 100 * 10) / 1e6)


def test_reasoning_is_priced_as_output():
    # Reasoning tokens are already part of output_tokens: they must not be charged twice.
    plain = Pricer().cost(row("o3", input_tokens=100, output_tokens=500))
    reasoning = Pricer().cost(row("o3", input_tokens=100, output_tokens=500, reasoning_tokens=400))
    assert plain == reasoning
    expected = calc_price(Usage(input_tokens=100, output_tokens=500), "o3", provider_id="openai",
                          genai_request_timestamp=__import__("datetime").datetime(2026, 11, 22, 10))
    assert reasoning == pytest.approx(float(expected.total_price))


def test_service_tiers_have_their_own_price():
    usage = {"input_tokens": 10_000, "cached_tokens": 2_000, "output_tokens": 3_000}
    pricer = Pricer()
    default = pricer.cost(row("gpt-5-2025-08-07", service_tier="default", **usage))
    flex = pricer.cost(row("gpt-5-2025-08-07", service_tier="flex", **usage))
    priority = pricer.cost(row("gpt-5-2025-08-07", service_tier="priority", **usage))
    assert default is not None and flex is not None and priority is not None
    assert flex < default < priority


def test_override_wins_and_matches_snapshots():
    prices = {"gpt-4o": config_mod.Price(input=1.0, output=2.0, cached_input=0.5)}
    cost = Pricer(prices).cost(row("gpt-4o-2024-08-06", input_tokens=1_000_000, cached_tokens=200_000,
                                   output_tokens=1_000_000, reasoning_tokens=10))
    assert cost == pytest.approx(0.8 * 1.0 + 0.2 * 0.5 + 2.0)
    # gpt-4o-mini is not gpt-4o: the catalogue prices it.
    mini = Pricer(prices).cost(row("gpt-4o-mini", input_tokens=1_000_000, output_tokens=0))
    assert mini == pytest.approx(0.15)


def test_override_without_cached_price_charges_cached_as_input():
    prices = {"my-model": config_mod.Price(input=3.0, output=6.0)}
    assert Pricer(prices).cost(row("my-model", input_tokens=1000, cached_tokens=500, output_tokens=0)) == \
        pytest.approx(3000 / 1e6)


def test_unknown_model_is_null_and_warned_once(caplog):
    pricer = Pricer()
    rows = [row("no-such-model-xyz", input_tokens=10, output_tokens=5) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="addon.metering.pricing"):
        pricer(rows)
    assert [r["cost_usd"] for r in rows] == [None, None, None]
    warnings = [r for r in caplog.records if "no-such-model-xyz" in r.getMessage()]
    assert len(warnings) == 1


def test_rows_without_usage_have_no_cost():
    pricer = Pricer()
    blocked = row("gpt-4o", outcome="blocked")
    no_model = {"ts": "2026-11-22T10:00:00.000Z", "model": None, "input_tokens": 5}
    pricer([blocked, no_model])
    assert blocked["cost_usd"] is None and no_model["cost_usd"] is None


def test_audio_seconds_and_free_models():
    pricer = Pricer()
    # whisper-1: $0.006 per minute.
    assert pricer.cost(row("whisper-1", audio_seconds=60.0)) == pytest.approx(0.006)
    # Moderation is free: a real 0, not a missing price.
    assert pricer.cost(row("omni-moderation-latest", input_tokens=100, output_tokens=0)) == 0


def test_catalogue_needs_no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access while pricing")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert Pricer().cost(row("gpt-4.1-mini", input_tokens=1000, output_tokens=1000)) is not None


def _write_config(path, text):
    path.write_text(text)
    return path


def test_reprice_command(tmp_path):
    db_path = tmp_path / "usage.db"
    db = schema.connect(db_path)
    schema.migrate(db)
    db.table("requests").insert_all([
        row("gpt-4o", input_tokens=1_000_000, output_tokens=0, cost_usd=99.0, day="2026-11-22"),
        row("house-model", input_tokens=1_000_000, output_tokens=1_000_000, cost_usd=None, day="2026-11-22"),
        row("gpt-4o", outcome="blocked", cost_usd=None, day="2026-11-22"),
    ], columns=schema.REQUEST_COLUMNS)
    db.conn.close()
    config = _write_config(tmp_path / "config.toml", """
[pools.all]
models = ["*"]

[prices."house-model"]
input = 1.5
output = 4
""")
    result = subprocess.run([sys.executable, "-m", "addon", "reprice", "--db", str(db_path), "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Every row changes: the two costs, and the cost_status of all three.
    assert "3 rows" in result.stdout and "3 changed" in result.stdout
    conn = sqlite3.connect(db_path)
    costs = [r[0] for r in conn.execute("select cost_usd from requests order by id")]
    conn.close()
    assert costs[0] == pytest.approx(2.5)
    assert costs[1] == pytest.approx(5.5)
    assert costs[2] is None


def test_reprice_reports_unknown(tmp_path):
    db = schema.connect(tmp_path / "usage.db")
    schema.migrate(db)
    db.table("requests").insert(row("mystery-1", input_tokens=1, output_tokens=1, id=7), columns=schema.REQUEST_COLUMNS)
    counts = reprice(db, Pricer())
    assert counts == {"rows": 1, "changed": 1, "priced": 0, "unpriced": 1, "free": 0, "no_usage": 0}
    assert db.execute("select cost_status from requests").fetchone() == ("unknown_price",)
    assert reprice(db, Pricer())["changed"] == 0


def test_proxy_prices_rows(make_proxy, tmp_path):
    """Through the real proxy: catalogue prices, an override and an unknown model."""
    config = _write_config(tmp_path / "config.toml", """
default_pool = "main"
[pools.main]
models = ["*"]

[prices."gpt-4o-mini"]
input = 1
output = 2
cached_input = 0.5
""")
    proxy = make_proxy(options={"usage_config": str(config)})
    client = proxy.client()
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi there"}])
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    stream = client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}], stream=True)
    for _ in stream:
        pass
    client.chat.completions.create(model="unknown-model-q", messages=[{"role": "user", "content": "hi"}])
    rows = {r["requested_model"]: r for r in proxy.wait_rows(4)}
    assert len(rows) == 4

    def expected(r, input_rate, cached_rate, output_rate):
        uncached = r["input_tokens"] - r["cached_tokens"]
        return (uncached * input_rate + r["cached_tokens"] * cached_rate + r["output_tokens"] * output_rate) / 1e6

    gpt4o = rows["gpt-4o"]
    assert gpt4o["model"] == "gpt-4o-2024-08-06" and gpt4o["cached_tokens"] > 0
    assert gpt4o["cost_usd"] == pytest.approx(expected(gpt4o, 2.5, 1.25, 10))
    mini = rows["gpt-4o-mini"]
    assert mini["cost_usd"] == pytest.approx(expected(mini, 1, 0.5, 2))
    gpt5 = rows["gpt-5"]
    assert gpt5["reasoning_tokens"] > 0
    assert gpt5["cost_usd"] == pytest.approx(expected(gpt5, 1.25, 0.125, 10))
    assert rows["unknown-model-q"]["cost_usd"] is None
    log = proxy.log()
    assert log.count("unknown-model-q") >= 1 and "no price known" in log
    assert Decimal(str(gpt4o["cost_usd"])) > 0


def test_rates_give_exactly_what_genai_prices_computes():
    """The per-model rates (resolved once per model, tier and day) against
    calc_price itself, for every OpenAI model in the catalogue, each tier,
    assorted text usages."""
    import random
    from datetime import datetime, timezone

    from genai_prices.data_snapshot import get_snapshot

    when = datetime(2026, 11, 22, 10, tzinfo=timezone.utc)
    provider = next(p for p in get_snapshot().providers if p.id == "openai")
    rng = random.Random(3)
    pricer = Pricer()
    fast = 0
    for info in provider.models:
        for tier in (None, "flex", "priority"):
            for _ in range(4):
                input_tokens = rng.choice([0, 1, 17, 999, 128_000, 250_000, rng.randint(0, 400_000)])
                cached = rng.randint(0, input_tokens)
                output = rng.choice([0, 1, rng.randint(0, 100_000)])
                r = row(info.id, input_tokens=input_tokens, cached_tokens=cached, output_tokens=output,
                        service_tier=tier)
                try:
                    expected = calc_price(Usage(input_tokens=input_tokens, cache_read_tokens=cached,
                                                output_tokens=output), info.id, provider_id="openai",
                                          genai_request_timestamp=when,
                                          price_context={"service_tier": tier} if tier else None)
                except Exception:
                    continue  # a model the catalogue cannot price this way
                variants = [v for v in info.price_variants or () if v.when == {"service_tier": tier}
                            and (v.constraint is None or v.constraint.active(when))]
                resolved = info.get_prices(when, {"service_tier": tier} if tier else None)
                free = not any(v is not None for v in vars(resolved).values())
                lacking = not free and (
                    (input_tokens - cached and resolved.input_mtok is None)
                    or (cached and resolved.cache_read_mtok is None and resolved.input_mtok is None)
                    or (output and resolved.output_mtok is None))
                if free:
                    assert pricer.quote(r) == (0.0, "free")
                    continue
                if (tier is not None and not variants) or lacking:
                    # genai-prices prices an unknown tier at the standard rate and drops
                    # units the model has no price for; here the cost is unknown.
                    assert pricer.quote(r) == (None, "unknown_price"), (info.id, tier, r)
                    continue
                assert pricer.cost(r) == round(float(expected.total_price), 10), (info.id, tier, r)
        fast += pricer._rates.get((info.id, None, False, when.date())) is not None
    assert fast > 100  # rates are resolved once per model, tier and day
    for model in ("gpt-4o-mini-2024-07-18", "gpt-5", "gpt-4.1"):
        for tier in (None, "flex", "priority"):
            pricer.cost(row(model, input_tokens=10, output_tokens=10, service_tier=tier))
        assert all(pricer._rates.get((model, tier, False, when.date())) for tier in (None, "flex", "priority"))
