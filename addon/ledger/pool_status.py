"""What each pool (and each key with its own limit) has used in its current window.

The one implementation of "tokens used in the window" and what follows from
it (reserved, remaining, window_start, resets_at, exhausted_at): the proxy's
ledger (sqlite_ledger.py), `python -m addon status`, `top`, the Datasette status API
(through the SQL function `usage_status_json()` of the plugin) and the HTTP
API all call `statuses()` here, on whatever connection they hold, inside
their own read transaction.

Definitions (all times UTC, rows by their `ts`):

- the window is the calendar window (day, week from Monday, month) in the
  pool's time zone that contains now, or the last N hours for `rolling:Nh`;
- counting starts at the window's start or at the latest reset inside it
  (`python -m addon reset`); a reset of the pool applies to its keys too;
- used: the sum of `total_tokens` of the scope's rows from there on (to the
  window's end; a rolling window has none);
- reserved: live reservations of every proxy by requests in flight; held:
  spare tokens of leases, promised to no request yet (as of each owner's
  last transaction); remaining = limit - used - reserved - held, at least 0;
- resets_at: the window's end; for a rolling window, when its oldest counted
  usage ages out (None when nothing is counted);
- exhausted_at: when remaining runs out at the pace of the last hour (the
  scope's tokens of the last 60 minutes); now when nothing remains; None for
  track-only pools, with no usage in the last hour, or when that is not
  before resets_at.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from addon.config import Config
from addon.windows import Window, iso_utc

PACE_PERIOD = timedelta(hours=1)  # exhausted_at: at the pace of the last hour

ScopeKey = tuple[str, str | None]  # (pool, key_id); key_id None: the whole pool


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class Scope:
    """A limit to report on: a pool, or a key with its own limit in a pool."""

    pool: str
    window: Window
    tz: ZoneInfo
    limit: int | None
    key_id: str | None = None
    label: str | None = None


@dataclass(slots=True)
class PoolStatus:
    pool: str
    key_id: str | None
    label: str | None
    window: str
    limit: int | None
    used: int
    reserved: int
    window_start: datetime  # counting start: the window's start or a later reset
    resets_at: datetime | None
    exhausted_at: datetime | None = None
    pace_per_hour: int = 0  # the scope's tokens in the last hour
    timezone: str | None = None
    held: int = 0  # spare tokens of leases: reserved in the database for no request yet

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used - self.reserved - self.held, 0)

    @property
    def percentage(self) -> float | None:
        if self.limit is None:
            return None
        return 100.0 if self.limit == 0 else round(100.0 * self.used / self.limit, 2)


# -- which scopes ----------------------------------------------------------------
def config_scopes(config: Config) -> list[Scope]:
    """Each pool of a config, each followed by the keys that have their own limit in it."""
    scopes = []
    for pool in config.pools.values():
        scopes.append(Scope(pool.name, pool.window, config.timezone, pool.limit))
        for rule in config.keys.values():
            if pool.name in rule.limits:
                scopes.append(Scope(pool.name, pool.window, config.timezone, rule.limits[pool.name],
                                    rule.key_id, rule.label))
    return scopes


def published_scopes(conn: sqlite3.Connection) -> list[Scope]:
    """The scopes the proxy published (tables `pools` and `key_limits`); [] when none."""
    try:
        pools = conn.execute('SELECT name, "limit", "window", timezone FROM pools ORDER BY rowid').fetchall()
    except sqlite3.OperationalError:
        return []
    try:
        keys = conn.execute('SELECT pool, key_id, label, "limit" FROM key_limits ORDER BY rowid').fetchall()
    except sqlite3.OperationalError:
        keys = []
    scopes = []
    for name, limit, window_text, tz_name in pools:
        try:
            window, tz = Window.parse(window_text), ZoneInfo(tz_name or "UTC")
        except (ValueError, ZoneInfoNotFoundError):
            continue
        scopes.append(Scope(name, window, tz, limit))
        scopes += [Scope(name, window, tz, key_limit, key_id, label)
                   for pool, key_id, label, key_limit in keys if pool == name]
    return scopes


def scopes_for(conn: sqlite3.Connection, config: Config | None) -> list[Scope]:
    """`config` when given (--config overrides), else what the proxy published, else the bundled default."""
    if config is None:
        published = published_scopes(conn)
        if published:
            return published
        from addon import config as config_mod

        config = config_mod.load(None)
    return config_scopes(config)


# -- the computation --------------------------------------------------------------
def latest_resets(conn: sqlite3.Connection) -> dict[ScopeKey, list[datetime]]:
    """Every reset of each (pool, key), oldest first; key None: of the whole pool."""
    resets: dict[ScopeKey, list[datetime]] = {}
    try:
        rows = conn.execute("SELECT pool, key_id, ts FROM resets").fetchall()
    except sqlite3.OperationalError:
        return resets
    for pool, key_id, ts in rows:
        try:
            resets.setdefault((pool, key_id), []).append(parse_ts(ts))
        except (TypeError, ValueError):
            continue
    for moments in resets.values():
        moments.sort()
    return resets


def counting_bounds(window: Window, tz: ZoneInfo, now: datetime, resets: dict[ScopeKey, list[datetime]], pool: str,
                    key_id: str | None) -> tuple[datetime, datetime, datetime]:
    """(counting start, window end, window start): the latest reset inside the window, up to now, moves the start.

    A reset of the pool applies to its keys too; one stamped in the future (another machine's clock) waits.
    """
    start, end = window.bounds(now, tz)
    window_start = start
    scopes = [(pool, None)] + ([(pool, key_id)] if key_id is not None else [])
    for scope in scopes:
        for anchor in resets.get(scope, ()):
            if start < anchor <= now:
                start = anchor
    return start, end, window_start


def _scope_where(pool: str, key_id: str | None) -> tuple[str, list]:
    if key_id is None:
        return "pool = ?", [pool]
    return "pool = ? AND key_id = ?", [pool, key_id]


def used_in(conn: sqlite3.Connection, pool: str, key_id: str | None, start: datetime, end: datetime | None) -> int:
    """Tokens of the scope's rows with start <= ts (< end, when there is one)."""
    where, params = _scope_where(pool, key_id)
    sql = f"SELECT COALESCE(SUM(total_tokens), 0) FROM requests WHERE {where} AND ts >= ?"
    params.append(iso_utc(start))
    if end is not None:
        sql += " AND ts < ?"
        params.append(iso_utc(end))
    (total,) = conn.execute(sql, params).fetchone()
    return int(total)


def reserved_by_scope(conn: sqlite3.Connection, now: datetime) -> tuple[dict[ScopeKey, int], dict[ScopeKey, int]]:
    """Live reservations of every proxy by (pool, None) and (pool, key): (by requests in flight, held spare).

    A lease's `spare` is what its owner had promised to no request at its last transaction.
    """
    reserved: dict[ScopeKey, int] = {}
    held: dict[ScopeKey, int] = {}
    try:
        rows = conn.execute("SELECT pool, key_id, COALESCE(SUM(tokens), 0), COALESCE(SUM(MIN(COALESCE(spare, 0), "
                            "tokens)), 0) FROM reservations WHERE expires > ? GROUP BY pool, key_id",
                            (now.timestamp(),)).fetchall()
    except sqlite3.OperationalError:
        return reserved, held
    for pool, key_id, tokens, spare in rows:
        for scope in ((pool, None), (pool, key_id)) if key_id is not None else ((pool, None),):
            reserved[scope] = reserved.get(scope, 0) + tokens - spare
            held[scope] = held.get(scope, 0) + spare
    return reserved, held


def exhaustion(remaining: int | None, pace_per_hour: int, now: datetime, resets_at: datetime | None) -> datetime | None:
    """When `remaining` runs out at `pace_per_hour`; None when never before resets_at."""
    if remaining is None:
        return None
    if remaining <= 0:
        return now
    if pace_per_hour <= 0:
        return None
    moment = now + timedelta(hours=remaining / pace_per_hour)
    return None if resets_at is not None and moment >= resets_at else moment


# A cached equivalent of used_in(conn, pool, key, start, end) (the ledger's incremental counters).
Counted = Callable[[Scope, datetime, datetime | None], int]


def status_of(conn: sqlite3.Connection, scope: Scope, now: datetime, resets: dict[ScopeKey, list[datetime]],
              reserved: tuple[dict[ScopeKey, int], dict[ScopeKey, int]], counted: Counted | None = None,
              forecast: bool = True) -> PoolStatus:
    start, end, _ = counting_bounds(scope.window, scope.tz, now, resets, scope.pool, scope.key_id)
    rolling = scope.window.rolling_hours
    if counted is not None:
        used = counted(scope, start, None if rolling else end)
    else:
        used = used_in(conn, scope.pool, scope.key_id, start, None if rolling else end)
    if rolling:
        where, params = _scope_where(scope.pool, scope.key_id)
        (oldest,) = conn.execute(f"SELECT MIN(ts) FROM requests WHERE {where} AND ts >= ? AND total_tokens > 0",
                                 [*params, iso_utc(start)]).fetchone()
        resets_at = parse_ts(oldest) + timedelta(hours=rolling) if oldest else None
    else:
        resets_at = end
    # Pace: the scope's tokens of the last hour, whatever window they fell in.
    pace = 0
    if forecast:
        pace = used_in(conn, scope.pool, scope.key_id, now - PACE_PERIOD, now + timedelta(milliseconds=1))
    in_flight, held = reserved
    key = (scope.pool, scope.key_id)
    status = PoolStatus(scope.pool, scope.key_id, scope.label, scope.window.kind, scope.limit, used,
                        in_flight.get(key, 0), start, resets_at, None, pace, scope.tz.key, held.get(key, 0))
    if forecast:
        status.exhausted_at = exhaustion(status.remaining, pace, now, resets_at)
    return status


def statuses(conn: sqlite3.Connection, scopes: Iterable[Scope], now: datetime, *,
             resets: dict[ScopeKey, list[datetime]] | None = None, counted: Counted | None = None,
             forecast: bool = True) -> list[PoolStatus]:
    """Every scope as of `now`; run it inside one read transaction for a consistent picture.

    The ledger passes the resets and the counts it keeps (`counted`, equal to used_in by construction and by
    tests/test_pool_status.py) so that its once-a-second status costs no recount; `forecast=False` skips the
    last hour's pace and exhausted_at.
    """
    resets = latest_resets(conn) if resets is None else resets
    reserved = reserved_by_scope(conn, now)
    return [status_of(conn, scope, now, resets, reserved, counted, forecast) for scope in scopes]


def as_row(status: PoolStatus) -> dict:
    """The status as the JSON API, `status --json` and the SQL function give it."""
    def when(moment: datetime | None) -> str | None:
        return iso_utc(moment) if moment is not None else None

    return {
        "pool": status.pool,
        "key_id": status.key_id,
        "label": status.label,
        "limit": status.limit,
        "used": status.used,
        "reserved": status.reserved,
        "held": status.held,
        "remaining": status.remaining,
        "percentage": status.percentage,
        "window_start": when(status.window_start),
        "resets_at": when(status.resets_at),
        "exhausted_at": when(status.exhausted_at),
        "pace_per_hour": status.pace_per_hour,
        "window": status.window,
        "timezone": status.timezone,
    }


def status_json(conn: sqlite3.Connection, now: str | None = None) -> str:
    """The SQL function `usage_status_json([now])`: every published scope as a JSON array of rows."""
    moment = parse_ts(now) if now else datetime.now(timezone.utc)
    return json.dumps([as_row(s) for s in statuses(conn, scopes_for(conn, None), moment)])
