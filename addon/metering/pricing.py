"""What each call cost, in USD: `cost_usd` and `cost_status` of every row.

A row's cost is the sum of every component OpenAI bills separately: text
input (uncached, cached, cache writes), audio and image input, text, audio
and image output, hosted tool calls, TTS characters, images, audio minutes.
Rates come from, in order of precedence:

1. the config's `[prices."model"]` overrides, per component and per tier;
2. genai-prices (a pinned snapshot bundled with the package: offline), with
   its `service_tier` and batch variants;
3. the dated, cited table in `price_table.py` for what genai-prices lacks.

When a component the row used has no rate, `cost_usd` is NULL and
`cost_status` is `unknown_price`, never a number that leaves it out.
`free` is a real 0 (moderation), `no_usage` a row without usage.

`Pricer` runs on the writer thread (`UsageMeter.prepare_rows`), so lookups
never touch the event loop: rates are resolved once per model, tier and UTC
day, then each row is a few multiplications. An error pricing one row is
logged and leaves that row unpriced; it never disables a model.
`python -m addon reprice` (tools/reprice.py) recomputes every row with the current rules;
the addon that installs a Pricer on the meter is proxy/pricing.py.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from addon import config as config_mod
from addon.metering import price_table
from addon.metering.pools import match_score

log = logging.getLogger(__name__)

MILLION = 1_000_000
STANDARD_TIERS = frozenset({"default", "auto", "standard"})
STATUSES = ("priced", "free", "unknown_price", "no_usage")

# Override component -> genai-prices price key (our own keys for what it has none).
COMPONENT_KEYS = {
    "input": "input_mtok",
    "cached_input": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "output": "output_mtok",
    "audio_input": "input_audio_mtok",
    "cached_audio_input": "cache_audio_read_mtok",
    "audio_output": "output_audio_mtok",
    "image_input": "input_image_mtok",
    "image_output": "output_image_mtok",
    "characters": "input_mchars",
    "minute": "audio_hours",  # converted: per minute -> per hour
    "image": "image_each",
    "web_search": "web_searches_kcount",
    "file_search": "storage_searches_kcount",
    "code_interpreter": "container_each",
    "image_generation": "image_generation_kcount",
}
TOOL_KEYS = {"web_search": "web_searches_kcount", "file_search": "storage_searches_kcount",
             "container": "container_each", "image_generation": "image_generation_kcount"}


def _override_for(model: str, prices: dict[str, Any]) -> Any:
    """The most specific entry for a model: exact name, dated snapshot or glob."""
    best, best_score = None, 0
    for pattern, price in prices.items():
        score = match_score(model, pattern)
        if score > best_score:
            best, best_score = price, score
    return best


def _int(value: Any) -> int:
    if type(value) is int:
        return value
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


USAGE_COLUMNS = ("input_tokens", "output_tokens", "audio_seconds", "characters", "images")


def _has_usage(row: dict[str, Any]) -> bool:
    return any(row.get(column) is not None for column in USAGE_COLUMNS)


def _timestamp(ts: Any) -> datetime | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def billed_tier(row: dict[str, Any]) -> tuple[str | None, bool]:
    """(service tier priced, batch?) of a row: `processing` first, else `service_tier`."""
    processing = row.get("processing")
    if processing == "batch":
        return None, True
    tier = processing if processing and processing != "standard" else row.get("service_tier")
    if not isinstance(tier, str) or tier.lower() in STANDARD_TIERS:
        return None, False
    return tier.lower(), False


@dataclass(frozen=True, slots=True)
class Rates:
    """Resolved prices of one model for one tier and day: price key -> value."""

    values: dict[str, Any]
    free: bool = False
    problem: str | None = None  # why the row cannot be priced at all (unknown model or tier)
    image_aware: bool = False  # an image model: image output without its own rate is priced as output

    def get(self, key: str) -> Any:
        return self.values.get(key)


def _tiered(price: Any, total_input: int) -> Decimal:
    """A flat price, or genai-prices' TieredPrices: the whole usage at the rate
    of the highest tier its input tokens exceed."""
    base = getattr(price, "base", None)
    if base is None:
        return price
    for tier in reversed(price.tiers):
        if total_input > tier.start:
            return tier.price
    return base


class Unpriced(Exception):
    """A component the row used has no known rate."""


class Pricer:
    """Callable over a batch of rows: sets `cost_usd` and `cost_status` on each."""

    def __init__(self, prices: dict[str, config_mod.Price] | None = None, provider: str = "openai") -> None:
        self.overrides = dict(prices or {})
        self.provider = provider
        self._warned: set[tuple[str, str]] = set()
        self._rates: dict[tuple[Any, ...], Rates] = {}
        self._lock = threading.Lock()  # reprice and the writer may share one Pricer in tests

    @classmethod
    def from_config(cls, config: config_mod.Config | None) -> Pricer:
        return cls(config.prices if config is not None else {})

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            row["cost_usd"], row["cost_status"] = self.quote(row)

    def cost(self, row: dict[str, Any]) -> float | None:
        """USD for one row, or None when it has no usage or a price is unknown."""
        return self.quote(row)[0]

    def quote(self, row: dict[str, Any]) -> tuple[float | None, str]:
        """(cost_usd, cost_status) of one row. Never raises."""
        model = row.get("model")
        outcome = row.get("outcome")
        if not model or not isinstance(model, str):
            return None, "no_usage" if not _has_usage(row) else "unknown_price"
        try:
            tier, batch = billed_tier(row)
            when = _timestamp(row.get("ts")) or datetime.now(UTC)
            rates = self.rates(model, tier, batch, when)
            if rates.free and outcome in (None, "ok"):
                return 0.0, "free"
            if not _has_usage(row):
                return None, "no_usage"
            if rates.problem:
                self._warn(model, rates.problem)
                return None, "unknown_price"
            return round(float(self._sum(rates, row)), 10), "priced"
        except Unpriced as exc:
            self._warn(model, str(exc))
            return None, "unknown_price"
        except Exception as exc:  # odd usage or price data: this row only
            self._warn(model, f"pricing failed ({type(exc).__name__}: {exc})")
            return None, "unknown_price"

    # -- rates -------------------------------------------------------------------
    def rates(self, model: str, tier: str | None, batch: bool, when: datetime) -> Rates:
        key = (model, tier, batch, when.astimezone(UTC).date())
        found = self._rates.get(key)
        if found is None:
            found = self._resolve(model, tier, batch, when)
            with self._lock:
                if len(self._rates) > 10_000:
                    self._rates.clear()
                self._rates[key] = found
        return found

    def _resolve(self, model: str, tier: str | None, batch: bool, when: datetime) -> Rates:
        supplement = [e for e in price_table.ENTRIES if match_score(model, e.pattern)]
        supplement.sort(key=lambda e: match_score(model, e.pattern))
        values: dict[str, Any] = {}
        for entry in supplement:
            values.update(entry.rates)
        info = self._catalogue_model(model)
        known = info is not None or bool(supplement and any(e.pattern != "*" for e in supplement))
        catalogue_free = False
        tier_rates: dict[str, Any] = {}
        tier_known = tier is None
        batch_rates: dict[str, Any] = {}
        if info is not None:
            standard = {k: v for k, v in vars(info.get_prices(when)).items() if v is not None}
            catalogue_free = not standard
            values.update(standard)
            for variant in info.price_variants or ():
                if variant.constraint is not None and not variant.constraint.active(when):
                    continue
                overrides = {k: v for k, v in vars(variant.prices).items() if v is not None}
                if tier is not None and variant.when == {"service_tier": tier}:
                    tier_known = True
                    tier_rates.update(overrides)
                if batch and variant.when == {"processing": "batch"}:
                    batch_rates.update(overrides)
        override = _override_for(model, self.overrides)
        if override is not None:
            known = True
            values.update(_price_keys(override))
        free = (catalogue_free or any(e.free for e in supplement)) and override is None
        if batch:
            if batch_rates:  # genai-prices' batch price of the model
                values.update(batch_rates)
            else:  # OpenAI's Batch API rule: half the standard price of inputs and outputs
                values = {k: (_scaled(v, price_table.BATCH_DISCOUNT) if k.endswith("_mtok") else v)
                          for k, v in values.items()}
            if override is not None and "batch" in override.tiers:
                values.update(_price_keys(override.tiers["batch"]))
        if tier is not None:
            if override is not None and tier in override.tiers:
                tier_known = True
                tier_rates.update(_price_keys(override.tiers[tier]))
            values.update(tier_rates)
        problem = None
        if not known and not free:
            problem = "no price known"
        elif not tier_known:
            problem = f"no price known for service tier {tier!r}"
        return Rates(values, free=free, problem=problem, image_aware=any("image" in key for key in values))

    def _catalogue_model(self, model: str) -> Any:
        from genai_prices.data_snapshot import get_snapshot

        try:
            _, info = get_snapshot().find_provider_model(model, None, self.provider, None)
        except LookupError:
            return None
        return info

    # -- the sum ----------------------------------------------------------------
    @staticmethod
    def _sum(rates: Rates, row: dict[str, Any]) -> Decimal:
        input_tokens = _int(row.get("input_tokens"))
        output_tokens = _int(row.get("output_tokens"))
        cached = _int(row.get("cached_tokens"))
        cached_audio = _int(row.get("cached_audio_tokens"))
        audio_in = _int(row.get("audio_input_tokens"))
        image_in = _int(row.get("image_input_tokens"))
        cache_write = _int(row.get("cache_write_tokens"))
        audio_out = _int(row.get("audio_output_tokens"))
        image_out = _int(row.get("image_output_tokens"))
        text_in = input_tokens - cached - (audio_in - cached_audio) - image_in - cache_write
        text_out = output_tokens - audio_out - image_out
        if min(text_in, text_out, cached - cached_audio, audio_in - cached_audio) < 0:
            raise Unpriced(f"usage parts exceed their totals (input {input_tokens}, cached {cached}, "
                           f"audio {audio_in}, image {image_in}, cache writes {cache_write}; output {output_tokens}, "
                           f"audio {audio_out}, image {image_out})")
        total = Decimal(0)

        def add(count: int | float, keys: tuple[str, ...], per: int, what: str) -> None:
            nonlocal total
            if not count:
                return
            for key in keys:
                price = rates.get(key)
                if price is not None and not isinstance(price, dict):
                    total += _tiered(price, input_tokens) * (Decimal(count) if type(count) is int
                                                             else Decimal(str(count))) / per
                    return
            raise Unpriced(f"no price known for {what}")

        add(text_in, ("input_mtok",), MILLION, "input tokens")
        add(cached - cached_audio, ("cache_read_mtok", "input_mtok"), MILLION, "cached input tokens")
        add(cache_write, ("cache_write_mtok",), MILLION, "cache-write tokens")
        add(audio_in - cached_audio, ("input_audio_mtok",), MILLION, "audio input tokens")
        add(cached_audio, ("cache_audio_read_mtok",), MILLION, "cached audio input tokens")
        add(image_in, ("input_image_mtok",), MILLION, "image input tokens")
        add(text_out, ("output_mtok",), MILLION, "output tokens")
        add(audio_out, ("output_audio_mtok",), MILLION, "audio output tokens")
        # Image models without a separate image output rate bill image output as output.
        add(image_out, ("output_image_mtok", "output_mtok") if rates.image_aware else ("output_image_mtok",), MILLION,
            "image output tokens")
        tools = row.get("tool_calls")
        if tools:
            calls = json.loads(tools) if isinstance(tools, str) else tools
            for tool, count in sorted(calls.items()):
                if tool in TOOL_KEYS:
                    per = 1 if tool == "container" else 1000
                    add(_int(count), (TOOL_KEYS[tool],), per, f"{tool} calls")
        if not input_tokens and not output_tokens:
            # Billed by something else than tokens (the version before wrote 0 tokens for whisper-1).
            seconds = row.get("audio_seconds")
            if seconds is not None:
                add(float(seconds), ("audio_hours", "input_audio_hours"), 3600, "audio seconds")
            add(_int(row.get("characters")), ("input_mchars",), MILLION, "characters")
            images = _int(row.get("images"))
            if images:
                total += images * _image_price(rates, row)
        return total

    def _warn(self, model: str, why: str) -> None:
        with self._lock:
            if (model, why) in self._warned or len(self._warned) > 1000:
                return
            self._warned.add((model, why))
        log.warning(
            "usage: %s for model %r; its cost_usd stays NULL (cost_status unknown_price). Add [prices.%r] "
            "(see README, Costs) to the config and run `python -m addon reprice`.",
            why, model, model,
        )


def _scaled(value: Any, factor: Decimal) -> Any:
    base = getattr(value, "base", None)
    if base is None:
        return value * factor
    from genai_prices import types

    return types.TieredPrices(base * factor, [types.Tier(t.start, t.price * factor) for t in value.tiers])


def _price_keys(price: config_mod.Price) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in price.components().items():
        amount = Decimal(str(value))
        out[COMPONENT_KEYS[name]] = amount * 60 if name == "minute" else amount
    return out


def _image_price(rates: Rates, row: dict[str, Any]) -> Decimal:
    table = rates.get("image_each")
    if isinstance(table, Decimal):
        return table
    if not isinstance(table, dict):
        raise Unpriced("no price known for images")
    entry = next((e for e in price_table.DALL_E if match_score(str(row.get("model")), e.pattern)), None)
    defaults = entry.extra if entry else {}
    size = row.get("image_size") or defaults.get("default_size", "1024x1024")
    quality = row.get("image_quality") or defaults.get("default_quality", "standard")
    if quality in ("auto",):
        quality = defaults.get("default_quality", "standard")
    price = table.get(f"{size}/{quality}") or table.get(f"{size}/standard")
    if price is None:
        raise Unpriced(f"no price known for images of size {size!r}, quality {quality!r}")
    return price


def shadowed_snapshots(overrides: dict[str, config_mod.Price], provider: str = "openai") -> list[str]:
    """Warnings for override patterns that also cover names the catalogue prices
    differently (`[prices."gpt-4o"]` covers `gpt-4o-2024-05-13`, priced on its own)."""
    from genai_prices.data_snapshot import get_snapshot

    names: dict[str, Any] = {}
    for prov in get_snapshot().providers:
        if prov.id != provider:
            continue
        for info in prov.models:
            for name in _clause_names(info.match):
                names.setdefault(name, info)
    now = datetime.now(UTC)
    messages = []
    for pattern in overrides:
        own = Pricer()._catalogue_model(pattern) if "*" not in pattern else None
        own_prices = str(own.get_prices(now)) if own is not None else None
        covered = []
        for name, info in sorted(names.items()):
            if name == pattern or not match_score(name, pattern) or _override_for(name, overrides) is not \
                    overrides[pattern]:
                continue
            theirs = str(info.get_prices(now))
            if own is None or (info.id != own.id and theirs != own_prices):
                covered.append((name, theirs or "free"))
        if covered:
            names_text = ", ".join(f"{n} ({p})" if len(covered) <= 3 else n for n, p in covered[:10])
            more = f" and {len(covered) - 10} more" if len(covered) > 10 else ""
            messages.append(
                f"usage: [prices.{pattern!r}] also covers {names_text}{more}, which the catalogue prices differently; "
                f"the override wins for them too. Add an exact [prices.\"NAME\"] to keep the catalogue's price.")
    return messages


def _clause_names(clause: Any) -> list[str]:
    if hasattr(clause, "equals"):
        return [clause.equals]
    for attr in ("or_", "and_"):
        if hasattr(clause, attr):
            return [n for sub in getattr(clause, attr) for n in _clause_names(sub)]
    return []
