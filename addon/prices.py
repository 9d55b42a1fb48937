"""What each call cost, in USD: `cost_usd` of every row in `requests`.

Prices come from genai-prices (a snapshot bundled with the package, so it
works offline), or from `[prices."model"]` in the config file, which wins.
Cached input is priced as cached input, reasoning tokens as output (they are
part of it), and the `flex` / `priority` service tiers at their own rates
where the price data has them. A model without a known price gets NULL, never
a guessed 0, and one warning in the log.

`Pricer` runs on the writer thread (`UsageMeter.prepare_rows`), so lookups
never touch the event loop. `python -m addon reprice` recomputes every row
after the prices or the overrides changed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from . import config as config_mod
from .pools import match_score

log = logging.getLogger(__name__)

# Service tiers that genai-prices prices differently ("default"/"auto" use the standard price).
PRICED_TIERS = frozenset({"flex", "priority"})
MILLION = 1_000_000


def _override_for(model: str, prices: dict[str, config_mod.Price]) -> config_mod.Price | None:
    """The config's price for a model: exact name, dated snapshot or glob, most specific first."""
    best, best_score = None, 0
    for pattern, price in prices.items():
        score = match_score(model, pattern)
        if score > best_score:
            best, best_score = price, score
    return best


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _has_usage(row: dict[str, Any]) -> bool:
    return any(row.get(column) is not None for column in ("input_tokens", "output_tokens", "audio_seconds"))


def _timestamp(ts: Any) -> datetime | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


class Pricer:
    """Callable over a batch of rows: sets `cost_usd` on each one that has usage."""

    def __init__(self, prices: dict[str, config_mod.Price] | None = None, provider: str = "openai") -> None:
        self.overrides = dict(prices or {})
        self.provider = provider
        self._unknown: set[str] = set()
        self._rates: dict[tuple[Any, ...], tuple[Decimal, Decimal, Decimal] | None] = {}
        self._lock = threading.Lock()  # reprice and the writer may share one Pricer in tests

    @classmethod
    def from_config(cls, config: config_mod.Config | None) -> Pricer:
        return cls(config.prices if config is not None else {})

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            row["cost_usd"] = self.cost(row)

    def cost(self, row: dict[str, Any]) -> float | None:
        """USD for one row, or None when it has no usage or the model's price is unknown."""
        model = row.get("model")
        if not model or not _has_usage(row):
            return None
        override = _override_for(model, self.overrides)
        # Overrides are per token; a duration-billed row (whisper-1) keeps the catalogue price.
        has_tokens = row.get("input_tokens") is not None or row.get("output_tokens") is not None
        if override is not None and has_tokens:
            return self._override_cost(row, override)
        return self._catalogue_cost(model, row)

    @staticmethod
    def _override_cost(row: dict[str, Any], price: config_mod.Price) -> float:
        input_tokens = _int(row.get("input_tokens"))
        cached = min(_int(row.get("cached_tokens")), input_tokens)
        output = _int(row.get("output_tokens"))  # includes reasoning
        cached_rate = price.cached_input if price.cached_input is not None else price.input
        usd = ((input_tokens - cached) * price.input + cached * cached_rate + output * price.output) / MILLION
        return round(usd, 10)

    def _catalogue_cost(self, model: str, row: dict[str, Any]) -> float | None:
        from genai_prices import Usage, calc_price

        if model in self._unknown:
            return None
        values: dict[str, int | float] = {}
        if row.get("input_tokens") is not None:
            values["input_tokens"] = _int(row["input_tokens"])
            values["cache_read_tokens"] = min(_int(row.get("cached_tokens")), values["input_tokens"])
        if row.get("output_tokens") is not None:
            values["output_tokens"] = _int(row["output_tokens"])
        if row.get("audio_seconds") is not None and not values:
            values["audio_seconds"] = float(row["audio_seconds"])
        tier = row.get("service_tier")
        tier = tier if tier in PRICED_TIERS else None
        when = _timestamp(row.get("ts")) or datetime.now(UTC)
        if "audio_seconds" not in values:
            rates = self._linear_rates(model, tier, when)
            if rates is not None:
                return self._linear_cost(rates, values)
        try:
            result = calc_price(
                Usage(**values),
                model,
                provider_id=self.provider,
                genai_request_timestamp=when,
                price_context={"service_tier": tier} if tier else None,
            )
        except LookupError:
            self._warn_unknown(model)
            return None
        except Exception as exc:  # a usage shape the price data cannot price
            self._warn_unknown(model, f"{type(exc).__name__}: {exc}")
            return None
        return round(float(result.total_price), 10)

    # genai-prices prices a row in ~100 us (a general unit registry): too much
    # for every row of a busy proxy. Most models' prices are constant per
    # token, so the cost is linear in (uncached input, cached input, output):
    # the rates are read once per model, tier and UTC day (prices change at
    # a start date), by pricing probe usages, and checked against one more
    # probe. Tiered prices and other time conditions keep the full calculation.
    @staticmethod
    def _linear_cost(rates: tuple[Decimal, Decimal, Decimal], values: dict[str, int | float]) -> float:
        input_tokens = int(values.get("input_tokens", 0))
        cached = int(values.get("cache_read_tokens", 0))
        usd = ((input_tokens - cached) * rates[0] + cached * rates[1] + int(values.get("output_tokens", 0)) * rates[2])
        return round(float(usd / MILLION), 10)

    def _linear_rates(self, model: str, tier: str | None, when: datetime) -> tuple[Decimal, Decimal, Decimal] | None:
        key = (model, tier, when.astimezone(UTC).date())
        try:
            return self._rates[key]
        except KeyError:
            pass
        try:
            rates = self._probe_rates(model, tier, when)
        except Exception:  # unknown model, odd price data: the full calculation decides
            rates = None
        self._rates[key] = rates
        return rates

    def _probe_rates(self, model: str, tier: str | None, when: datetime) -> tuple[Decimal, Decimal, Decimal] | None:
        from genai_prices import Usage, calc_price, types
        from genai_prices.data_snapshot import get_snapshot

        _, info = get_snapshot().find_provider_model(model, None, self.provider, None)
        constraints = [getattr(conditional, "constraint", None) for conditional in
                       ([] if isinstance(info.prices, types.ModelPrice) else info.prices)]
        constraints += [variant.constraint for variant in info.price_variants or ()]
        if any(c is not None and not isinstance(c, types.StartDateConstraint) for c in constraints):
            return None  # prices that change within a day
        context = {"service_tier": tier} if tier else None
        resolved = info.get_prices(when, context)
        if any(isinstance(value, types.TieredPrices) for value in vars(resolved).values()):
            return None

        def price(input_tokens: int, cached: int, output: int) -> Decimal:
            usage = Usage(input_tokens=input_tokens, cache_read_tokens=cached, output_tokens=output)
            return calc_price(usage, model, provider_id=self.provider, genai_request_timestamp=when,
                              price_context=context).total_price

        rates = (price(MILLION, 0, 0), price(MILLION, MILLION, 0), price(0, 0, MILLION))
        probe = (123_457, 45_678, 9_876)
        expected = ((probe[0] - probe[1]) * rates[0] + probe[1] * rates[1] + probe[2] * rates[2]) / MILLION
        if abs(price(*probe) - expected) > Decimal("1e-15"):
            return None
        return rates

    def _warn_unknown(self, model: str, why: str = "no price known") -> None:
        with self._lock:
            if model in self._unknown:
                return
            self._unknown.add(model)
        log.warning(
            "usage: %s for model %r; its cost_usd stays NULL. Add [prices.%r] with input/output "
            "(USD per million tokens) to the config and run `python -m addon reprice`.",
            why,
            model,
            model,
        )


class Pricing:
    """mitmproxy addon: installs a Pricer on the meter, rebuilt when the config changes."""

    def __init__(self, meter: Any) -> None:
        self.meter = meter

    def configure(self, updated: set[str]) -> None:
        # The meter's own configure ran first (it comes earlier in `addons`).
        if "usage_config" in updated or self.meter.prepare_rows is None:
            first = self.meter.prepare_rows is None
            self.meter.prepare_rows = Pricer.from_config(self.meter.config)
            if first:
                # Loading the price data takes ~0.5 s: do it now, off the event loop,
                # rather than delay the writer's first batch.
                threading.Thread(target=_warm_up, name="usage-prices-warmup", daemon=True).start()


def _warm_up() -> None:
    try:
        Pricer().cost({"model": "gpt-4o", "input_tokens": 1, "output_tokens": 1})
    except Exception:  # only a warm-up; real rows report their own problems
        log.debug("usage: price data warm-up failed", exc_info=True)
    # The price catalogue and the modules loaded so far live as long as the
    # process: out of the garbage collector's way, a full collection no
    # longer scans them (100+ ms pauses of the event loop under load).
    gc.freeze()


# -- python -m addon reprice ---------------------------------------------------

PRICE_COLUMNS = ("id", "ts", "model", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
                 "audio_seconds", "service_tier", "cost_usd")


def reprice(db, pricer: Pricer, *, batch: int = 2000) -> dict[str, int]:
    """Recompute cost_usd of every row; returns counts of rows changed, priced and left unpriced."""
    counts = {"rows": 0, "changed": 0, "priced": 0, "unpriced": 0}
    last_id = 0
    columns = ", ".join(f'"{c}"' for c in PRICE_COLUMNS)
    while True:
        rows = [dict(zip(PRICE_COLUMNS, r, strict=True)) for r in db.execute(
            f"select {columns} from requests where id > ? order by id limit ?", [last_id, batch]).fetchall()]
        if not rows:
            return counts
        last_id = rows[-1]["id"]
        updates = []
        for row in rows:
            counts["rows"] += 1
            cost = pricer.cost(row)
            if cost is not None:
                counts["priced"] += 1
            elif _has_usage(row):
                counts["unpriced"] += 1
            if cost != row["cost_usd"]:
                updates.append((cost, row["id"]))
        if updates:
            with db.conn:
                db.conn.executemany("update requests set cost_usd = ? where id = ?", updates)
            counts["changed"] += len(updates)


def _cmd_reprice(args: argparse.Namespace) -> int:
    from . import store

    config = config_mod.load(args.config)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    db = store.connect(args.db)
    try:
        store.migrate(db)
        counts = reprice(db, Pricer.from_config(config))
    finally:
        db.conn.close()
    print(
        f"repriced {counts['rows']} rows in {args.db}: {counts['changed']} changed, "
        f"{counts['priced']} priced, {counts['unpriced']} with usage but no known price (cost_usd NULL)"
    )
    return 0


def register(subparsers) -> None:
    from .cli import add_common

    parser = subparsers.add_parser(
        "reprice",
        help="recompute cost_usd of every recorded call",
        description="Recompute cost_usd of every row in `requests` from the bundled genai-prices data and the "
        "config's [prices] overrides, e.g. after changing an override or upgrading genai-prices.",
    )
    add_common(parser)
    parser.set_defaults(func=_cmd_reprice)
