"""The admission policy in pure functions: which limits apply to a request, what a decision says, how a
refusal reads. No database, no clock of its own: both ledgers (sqlite_ledger.py, redis_ledger.py) and the
Limits addon share these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from addon.config import Config, Pool
from addon.windows import iso_utc


@dataclass(slots=True)
class Check:
    """One limit that applies to a request: the pool's, or a key's in a pool."""

    pool: Pool
    limit: int
    key_id: str | None = None  # None: the whole pool

    @property
    def scope(self) -> str:
        return self.pool.name if self.key_id is None else f"{self.pool.name} for key {self.key_id}"


@dataclass(slots=True)
class Decision:
    admitted: bool
    reservation: int | None = None
    check: Check | None = None
    used: int = 0
    reserved: int = 0
    estimate: int = 0
    resets_at: datetime | None = None
    window_start: datetime | None = None
    reason: str | None = None  # when refused: "limit", "never" (more than the whole limit) or "unavailable"
    owner: str | None = None  # when admitted: the reservation's owner (what give_back and the row name)
    held: int = 0  # when refused: spare tokens other proxies hold for their next requests


def checks_for(config: Config, pool_name: str | None, key_id: str | None, label: str | None) -> list[Check]:
    pool = config.pools.get(pool_name or "")
    if pool is None:
        return []
    checks = []
    if pool.limit is not None:
        checks.append(Check(pool, pool.limit))
    rule = config.keys.get(key_id or "") or (config.keys.get(label) if label else None)
    if rule is not None and pool.name in rule.limits and key_id is not None:
        checks.append(Check(pool, rule.limits[pool.name], key_id))
    return checks


def never_fits(checks: list[Check], estimate: int) -> Check | None:
    """The check whose whole limit is smaller than the estimate: refused now and after every reset."""
    return next((check for check in checks if estimate > check.limit), None)


def seconds_until(moment: datetime | None, now: datetime) -> int:
    if moment is None:
        return 60
    return max(int((moment - now).total_seconds() + 0.999), 1)


def window_phrase(window: str) -> str:
    """day -> daily, rolling:24h -> rolling 24h."""
    return {"day": "daily", "week": "weekly", "month": "monthly"}.get(window, window.replace("rolling:", "rolling "))


def refusal_message(decision: Decision, now: datetime) -> str:
    check = decision.check
    assert check is not None
    whose = f"pool '{check.pool.name}'" + (f" for key {check.key_id}" if check.key_id else "")
    if decision.reason == "never":
        return (f"This request needs about {decision.estimate:,} tokens, more than the whole "
                f"{window_phrase(check.pool.window.kind)} limit of {whose} ({check.limit:,} tokens): "
                "it can never be admitted. "
                "Ask for fewer output tokens (max_tokens, n) or send less input. "
                "Refused by the usage proxy before reaching OpenAI.")
    when = iso_utc(decision.resets_at).replace(".000Z", "Z") if decision.resets_at else None
    window = check.pool.window.kind
    reset = f"It resets at {when} (in {seconds_until(decision.resets_at, now)} s)." if when else (
        f"It is a rolling {window.split(':')[1]} window: capacity returns as older usage ages out.")
    return (
        f"Usage limit reached for pool '{check.pool.name}'"
        + (f" (key {check.key_id})" if check.key_id else "")
        + f": {decision.used:,} of its {window_phrase(window)} {check.limit:,} tokens used"
        + (f", {decision.reserved:,} reserved by requests in flight" if decision.reserved else "")
        + (f", {decision.held:,} held by other proxies for their next requests" if decision.held else "")
        + f"; this request needs about {decision.estimate:,}. {reset}"
        + " Refused by the usage proxy before reaching OpenAI."
    )
