"""The TOML configuration: pools, limits, keys, alerts, price overrides.

Loaded and validated completely before anything uses it: a bad file raises
ConfigError naming the file, the line and the problem, and nothing of it is
applied.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from addon.windows import Window

DEFAULT_CONFIG = Path(__file__).with_name("default-config.toml")
DEFAULT_THRESHOLDS = (80.0, 100.0)
FAIL_POLICIES = ("open", "closed")


class ConfigError(ValueError):
    """A configuration problem, with where it is."""


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    models: tuple[str, ...]
    window: Window
    limit: int | None = None  # None: track only
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    fail: str = "open"  # what to do when usage cannot be known


@dataclass(frozen=True, slots=True)
class KeyRule:
    key_id: str
    label: str | None = None
    limits: dict[str, int] = field(default_factory=dict)  # pool -> tokens per window


# Components an override can price, and their unit.
PRICE_COMPONENTS: dict[str, str] = {
    "input": "USD per million input tokens (text, not cached)",
    "cached_input": "USD per million cached input tokens (default: the input price)",
    "cache_write": "USD per million cache-write tokens",
    "output": "USD per million output tokens (text, reasoning included)",
    "audio_input": "USD per million audio input tokens",
    "cached_audio_input": "USD per million cached audio input tokens",
    "audio_output": "USD per million audio output tokens",
    "image_input": "USD per million image input tokens",
    "image_output": "USD per million image output tokens",
    "characters": "USD per million characters (TTS)",
    "minute": "USD per minute of audio (duration-billed transcription)",
    "image": "USD per image (per-image models)",
    "web_search": "USD per 1,000 web_search calls",
    "file_search": "USD per 1,000 file_search calls",
    "code_interpreter": "USD per Code Interpreter container",
    "image_generation": "USD per 1,000 image_generation calls",
}
_TIER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


@dataclass(frozen=True, slots=True)
class Price:
    """A `[prices."pattern"]` override: any of PRICE_COMPONENTS, plus rates per
    service tier (or `batch`) in sub-tables such as `[prices."gpt-5".priority]`."""

    input: float | None = None
    output: float | None = None
    cached_input: float | None = None
    cache_write: float | None = None
    audio_input: float | None = None
    cached_audio_input: float | None = None
    audio_output: float | None = None
    image_input: float | None = None
    image_output: float | None = None
    characters: float | None = None
    minute: float | None = None
    image: float | None = None
    web_search: float | None = None
    file_search: float | None = None
    code_interpreter: float | None = None
    image_generation: float | None = None
    tiers: dict[str, Price] = field(default_factory=dict)

    def components(self) -> dict[str, float]:
        return {name: value for name in PRICE_COMPONENTS if (value := getattr(self, name)) is not None}


@dataclass(frozen=True, slots=True)
class IssuedKeysSettings:
    """[issued_keys]: per-user keys the proxy swaps for one upstream key."""

    enabled: bool = False
    upstream_key_env: str = "OPENAI_API_KEY"
    prefix: str = "sk-usr-"
    require: bool = False  # refuse requests that carry no issued key at all
    self_service: bool = False  # Datasette's /-/keys page lets anyone who reaches it create a key (intranets)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> IssuedKeysSettings:
        known = {f.name: f.default for f in fields(cls)}
        unknown = set(raw) - set(known)
        if unknown:
            raise ValueError(f"[issued_keys]: unknown setting {sorted(unknown)[0]!r} "
                             f"(known: {', '.join(sorted(known))})")
        values = {**known, **raw}
        for name in ("enabled", "require", "self_service"):
            if not isinstance(values[name], bool):
                raise ValueError(f"[issued_keys]: {name} must be true or false")
        for name in ("upstream_key_env", "prefix"):
            if not isinstance(values[name], str) or not values[name].strip():
                raise ValueError(f"[issued_keys]: {name} must be a non-empty string")
        if len(values["prefix"]) > 20:
            raise ValueError("[issued_keys]: prefix must be at most 20 characters")
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    timezone: ZoneInfo
    default_pool: str
    pools: dict[str, Pool]
    keys: dict[str, KeyRule] = field(default_factory=dict)
    webhook: str | None = None
    prices: dict[str, Price] = field(default_factory=dict)
    estimate_output_tokens: int = 1024
    issued_keys: IssuedKeysSettings = field(default_factory=IssuedKeysSettings)
    forecast_alerts: bool = False  # [alerts] forecast: alert when a pool is on pace to run out before its reset
    # Input assumed for the previous context of a continuation whose previous
    # response this database never recorded (see addon/ledger/estimate.py).
    estimate_previous_tokens: int = 8192
    batch_pool: str | None = "batch"  # where batches' usage counts; None: the batch's model's pool

    @property
    def timezone_name(self) -> str:
        return self.timezone.key


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOP_LEVEL = {"timezone", "default_pool", "pools", "keys", "alerts", "prices", "estimate_output_tokens", "issued_keys",
              "estimate_previous_tokens", "batch_pool"}
_POOL_KEYS = {"limit", "window", "models", "alerts", "fail"}


def load(path: str | Path | None = None) -> Config:
    """Read and validate a config file (the bundled default when None)."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    return parse(text, path)


_shared: tuple[tuple[str, int, int, int], Config] | None = None


def load_shared(path: str | Path | None = None) -> Config:
    """load() for the addons: on a reload, the first addon that asks reads and validates the
    file; the others get the same Config (until the file changes)."""
    global _shared
    resolved = Path(path) if path else DEFAULT_CONFIG
    try:
        st = resolved.stat()
        key = (str(resolved.resolve()), st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return load(resolved)  # load() says why it cannot be read
    if _shared is not None and _shared[0] == key:
        return _shared[1]
    config = load(resolved)
    _shared = (key, config)
    return config


def parse(text: str, path: str | Path = "<config>") -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        message = getattr(exc, "msg", str(exc))
        # Before Python 3.14 the position is only in the text: "(at line 2, column 9)".
        found = _TOML_POSITION.search(message)
        if found:
            line = line or int(found.group(1))
            message = message[: found.start()].rstrip() + f" (column {found.group(2)})"
        elif message.endswith("(at end of document)"):
            line = line or max(len(text.splitlines()), 1)
        where = f":{line}" if line else ""
        raise ConfigError(f"{path}{where}: invalid TOML: {message}") from None
    return _Validator(text, path).config(data)


class _Validator:
    def __init__(self, text: str, path: Path) -> None:
        self.lines = text.splitlines()
        self.path = path

    def fail(self, problem: str, *keys: str) -> ConfigError:
        line = self.line_of(*keys)
        where = f":{line}" if line else ""
        return ConfigError(f"{self.path}{where}: {problem}")

    def line_of(self, *keys: str) -> int | None:
        """Best-effort line number of a table/key path such as pools, mini, limit."""
        start = 0
        if len(keys) >= 2:
            table = _table_header(keys[:-1])
            for number, line in enumerate(self.lines):
                if table.match(line):
                    start = number
                    break
            else:
                table = _table_header(keys)
                for number, line in enumerate(self.lines):
                    if table.match(line):
                        return number + 1
        key = re.compile(rf"^\s*[\"']?{re.escape(keys[-1])}[\"']?\s*=") if keys else None
        for number in range(start, len(self.lines)):
            if key and key.match(self.lines[number]):
                return number + 1
        return start + 1 if len(keys) >= 2 and start else None

    def config(self, data: dict[str, Any]) -> Config:
        unknown = set(data) - _TOP_LEVEL
        if unknown:
            name = sorted(unknown)[0]
            raise self.fail(f"unknown setting {name!r} (known: {', '.join(sorted(_TOP_LEVEL))})", name)
        tz_name = data.get("timezone", "UTC")
        if not isinstance(tz_name, str):
            raise self.fail("timezone must be a string such as \"Europe/Paris\"", "timezone")
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            problem = f"unknown timezone {tz_name!r} (use an IANA name such as \"Europe/Paris\")"
            raise self.fail(problem, "timezone") from None

        alerts = data.get("alerts", {})
        if not isinstance(alerts, dict):
            raise self.fail("[alerts] must be a table", "alerts")
        unknown_alert = set(alerts) - {"thresholds", "webhook", "forecast"}
        if unknown_alert:
            name = sorted(unknown_alert)[0]
            raise self.fail(f"unknown setting {name!r} in [alerts]", "alerts", name)
        default_thresholds = self.thresholds(alerts.get("thresholds", list(DEFAULT_THRESHOLDS)), "alerts", "thresholds")
        webhook = alerts.get("webhook")
        if webhook is not None and (not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))):
            raise self.fail("alerts.webhook must be an http(s) URL", "alerts", "webhook")
        forecast = alerts.get("forecast", False)
        if not isinstance(forecast, bool):
            raise self.fail("alerts.forecast must be true or false", "alerts", "forecast")

        pools_data = data.get("pools")
        if not isinstance(pools_data, dict) or not pools_data:
            raise self.fail("at least one [pools.NAME] table is required", "pools")
        pools = {name: self.pool(name, body, default_thresholds) for name, body in pools_data.items()}

        default_pool = data.get("default_pool", next(iter(pools)))
        if default_pool not in pools:
            raise self.fail(f"default_pool {default_pool!r} is not a pool (pools: {', '.join(pools)})", "default_pool")

        keys = {}
        keys_data = data.get("keys", {})
        if not isinstance(keys_data, dict):
            raise self.fail("[keys] must be a table of key ids", "keys")
        for key_id, body in keys_data.items():
            keys[key_id] = self.key_rule(key_id, body, pools)

        prices = {}
        prices_data = data.get("prices", {})
        if not isinstance(prices_data, dict):
            raise self.fail("[prices] must be a table of models", "prices")
        for model, body in prices_data.items():
            prices[model] = self.price(model, body)

        estimate = data.get("estimate_output_tokens", 1024)
        if not isinstance(estimate, int) or isinstance(estimate, bool) or estimate < 0:
            raise self.fail("estimate_output_tokens must be a whole number >= 0", "estimate_output_tokens")
        issued_table = data.get("issued_keys", {})
        if not isinstance(issued_table, dict):
            raise self.fail("[issued_keys] must be a table", "issued_keys")
        try:
            issued = IssuedKeysSettings.parse(issued_table)
        except ValueError as exc:
            raise self.fail(str(exc), "issued_keys") from None
        previous = data.get("estimate_previous_tokens", 8192)
        if not isinstance(previous, int) or isinstance(previous, bool) or previous < 0:
            raise self.fail("estimate_previous_tokens must be a whole number >= 0", "estimate_previous_tokens")
        batch_pool = data.get("batch_pool", "batch")
        if not isinstance(batch_pool, str):
            raise self.fail("batch_pool must be a pool name, or \"\" for the batch's model's pool", "batch_pool")
        if batch_pool and batch_pool not in pools:
            # A pool of its own, track only, unless the file defines it.
            pools[batch_pool] = Pool(batch_pool, (), Window.parse("day"), None, default_thresholds, "open")

        return Config(
            path=self.path,
            timezone=tz,
            default_pool=default_pool,
            pools=pools,
            keys=keys,
            webhook=webhook,
            forecast_alerts=forecast,
            prices=prices,
            estimate_output_tokens=estimate,
            issued_keys=issued,
            estimate_previous_tokens=previous,
            batch_pool=batch_pool or None,
        )

    def thresholds(self, value: Any, *where: str) -> tuple[float, ...]:
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1000 for v in value
        ):
            raise self.fail("alert thresholds must be a list of percentages such as [80, 100]", *where)
        return tuple(sorted(float(v) for v in value))

    def pool(self, name: str, body: Any, default_thresholds: tuple[float, ...]) -> Pool:
        if not isinstance(body, dict):
            raise self.fail(f"pools.{name} must be a table", "pools", name)
        unknown = set(body) - _POOL_KEYS
        if unknown:
            key = sorted(unknown)[0]
            known = ", ".join(sorted(_POOL_KEYS))
            raise self.fail(f"unknown setting {key!r} in [pools.{name}] (known: {known})", "pools", name, key)
        limit = body.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise self.fail(f"pools.{name}.limit must be a whole number of tokens >= 0", "pools", name, "limit")
        window_text = body.get("window", "day")
        try:
            window = Window.parse(window_text) if isinstance(window_text, str) else Window.parse(repr(window_text))
        except ValueError as exc:
            raise self.fail(f"pools.{name}.window: {exc}", "pools", name, "window") from None
        models = body.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise self.fail(f"pools.{name}.models must be a list of model names or globs", "pools", name, "models")
        thresholds = default_thresholds
        if "alerts" in body:
            thresholds = self.thresholds(body["alerts"], "pools", name, "alerts")
        fail = body.get("fail", "closed" if limit is not None else "open")
        if fail not in FAIL_POLICIES:
            raise self.fail(f"pools.{name}.fail must be \"open\" or \"closed\"", "pools", name, "fail")
        return Pool(name, tuple(models), window, limit, thresholds, fail)

    def key_rule(self, key_id: str, body: Any, pools: dict[str, Pool]) -> KeyRule:
        if not isinstance(body, dict):
            raise self.fail(f"keys.{key_id} must be a table", "keys", key_id)
        unknown = set(body) - {"label", "limits"}
        if unknown:
            key = sorted(unknown)[0]
            raise self.fail(f"unknown setting {key!r} in [keys.{key_id}]", "keys", key_id, key)
        label = body.get("label")
        if label is not None and not isinstance(label, str):
            raise self.fail(f"keys.{key_id}.label must be a string", "keys", key_id, "label")
        limits = body.get("limits", {})
        if not isinstance(limits, dict):
            problem = f"keys.{key_id}.limits must be a table such as {{ premium = 100000 }}"
            raise self.fail(problem, "keys", key_id, "limits")
        for pool, limit in limits.items():
            if pool not in pools:
                raise self.fail(f"keys.{key_id}.limits names unknown pool {pool!r}", "keys", key_id, "limits")
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise self.fail(f"keys.{key_id}.limits.{pool} must be a whole number >= 0", "keys", key_id, "limits")
        return KeyRule(key_id, label, dict(limits))

    def price(self, model: str, body: Any, tier: str | None = None) -> Price:
        where = f"prices.{model!r}" + (f".{tier}" if tier else "")
        keys = ("prices", model, tier) if tier else ("prices", model)
        if not isinstance(body, dict):
            raise self.fail(f"{where} must be a table of prices", *keys)
        values: dict[str, Any] = {}
        tiers: dict[str, Price] = {}
        for name, value in body.items():
            if isinstance(value, dict) and tier is None:
                if not _TIER_NAME.match(name):
                    raise self.fail(f"{where}.{name}: not a service tier name (flex, priority, batch, ...)", *keys)
                tiers[name] = self.price(model, value, name)
                continue
            if name not in PRICE_COMPONENTS:
                known = ", ".join(PRICE_COMPONENTS)
                raise self.fail(f"unknown setting {name!r} in {where} (known: {known}; tables for tiers)", *keys)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise self.fail(f"{where}.{name} must be a number >= 0 ({PRICE_COMPONENTS[name]})", *keys, name)
            values[name] = float(value)
        if not values and not tiers:
            raise self.fail(f"{where} sets no price (e.g. input and output, USD per million tokens)", *keys)
        return Price(**values, tiers=tiers)


def _table_header(keys: tuple[str, ...]) -> re.Pattern[str]:
    parts = r"\s*\.\s*".join(rf"[\"']?{re.escape(k)}[\"']?" for k in keys)
    return re.compile(rf"^\s*\[\s*{parts}\s*\]")
