"""The ledger's shared state in Redis, for proxies on several hosts.

The SQLite ledger (sqlite_ledger.py) shares pools between processes on one file;
this one shares them between machines. The policy is the same: a request is
admitted when

    used (in the window) + reserved (by requests in flight, every proxy) + estimate <= limit

and refused before it goes upstream otherwise. Each admission and each
settlement is one Lua script, so it is atomic and costs one round trip.

Keys (prefix `usage:`):
- `used:{pool}:{key}:{window start}:{gen}`: tokens used in a calendar window
  (`key` is empty for the whole pool); expires two days after the window.
- `roll:{pool}:{key}:{gen}`: rolling windows, a hash of minute -> tokens.
- `rsv:{pool}:{key}` / `rexp:{pool}:{key}`: reservations of requests in
  flight (id -> tokens) and their expiry (a sorted set). A proxy refreshes
  its own every HEARTBEAT_INTERVAL; a proxy killed -9 leaves them to expire
  after RESERVATION_TTL.
- `gen:{pool}` and `gen:{pool}:{key}`: a reset increments it, which starts
  new counters (the old ones expire).
- `epoch`, `rebuilt:{epoch}:{origin}`: see `rebuild` (a Redis restart
  without persistence).
- `alert:...`, `resp:...`: alert-once and once-per-response markers.

Windows are chosen by Redis's clock (`TIME`): each proxy sends the bounds of
the windows around its own now (previous, current, next), and the script
takes the one that contains Redis's now, so proxies with skewed clocks count
into the same window.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import redis

from addon.config import Config, Pool
from addon.ledger import pool_status
from addon.ledger.estimate import PreviousUsage
from addon.ledger.policy import Check, Decision
from addon.ledger.pool_status import PoolStatus
from addon.ledger.published import record_reset, write_pools
from addon.ledger.reservations import RESERVATION_TTL
from addon.store import redis_rows, schema
from addon.store.inserts import Reservation
from addon.windows import Window, iso_utc, utc_now
from addon.worker import FailureLog, QueueWorker

log = logging.getLogger(__name__)

PREFIX = "usage:"
RESPONSE_MARKER_TTL = 30 * 86400  # a response id is counted once within 30 days
ALERT_MARKER_TTL = 40 * 86400
MAX_PENDING_OPS = 100_000
PREVIOUS_TTL = 86400  # a continuation's previous response is looked up for a day

_LUA_COMMON = """
local P = 'usage:'
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function window(now, rolling, wins)
  if rolling > 0 then return now - rolling, 0 end
  for s, e in string.gmatch(wins, '(%d+),(%d+)') do
    s = tonumber(s); e = tonumber(e)
    if s <= now and now < e then return s, e end
  end
  return nil, nil
end
local function gen(pool, key)
  local g = redis.call('GET', P .. 'gen:' .. pool) or '0'
  if key ~= '' then g = g .. '.' .. (redis.call('GET', P .. 'gen:' .. pool .. ':' .. key) or '0') end
  return g
end
local function used(pool, key, now, rolling, start)
  if rolling > 0 then
    local h = P .. 'roll:' .. pool .. ':' .. key .. ':' .. gen(pool, key)
    local flat = redis.call('HGETALL', h)
    local total = 0
    local horizon = math.floor((now - rolling) / 60)
    for i = 1, #flat, 2 do
      if tonumber(flat[i]) < horizon then redis.call('HDEL', h, flat[i])
      else total = total + tonumber(flat[i + 1]) end
    end
    return total
  end
  return tonumber(redis.call('GET', P .. 'used:' .. pool .. ':' .. key .. ':' .. start .. ':' .. gen(pool, key)) or '0')
end
local function reserved(pool, key, now)
  local z = P .. 'rexp:' .. pool .. ':' .. key
  local h = P .. 'rsv:' .. pool .. ':' .. key
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(gone) do redis.call('HDEL', h, id) end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
  local total = 0
  for _, v in ipairs(redis.call('HVALS', h)) do total = total + tonumber(v) end
  return total
end
local function count(pool, key, now, rolling, wins, tokens)
  if tokens <= 0 then return end
  local s, e = window(now, rolling, wins)
  if rolling > 0 then
    local h = P .. 'roll:' .. pool .. ':' .. key .. ':' .. gen(pool, key)
    redis.call('HINCRBY', h, tostring(math.floor(now / 60)), tokens)
    redis.call('EXPIRE', h, math.floor(rolling) + 3600)
  elseif s then
    local k = P .. 'used:' .. pool .. ':' .. key .. ':' .. s .. ':' .. gen(pool, key)
    redis.call('INCRBY', k, tokens)
    redis.call('EXPIRE', k, math.floor(e - now) + 2 * 86400)
  end
end
"""

# ARGV: estimate, reservation id, ttl, n, then n x (pool, key, limit, rolling seconds, windows).
_ADMIT = _LUA_COMMON + """
local epoch = redis.call('GET', P .. 'epoch')
if not epoch then return {'rebuild'} end
local estimate = tonumber(ARGV[1])
local rid = ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local now = now_s()
for i = 0, n - 1 do
  local pool, key, limit = ARGV[5 + i * 5], ARGV[6 + i * 5], tonumber(ARGV[7 + i * 5])
  local rolling, wins = tonumber(ARGV[8 + i * 5]), ARGV[9 + i * 5]
  local s, e = window(now, rolling, wins)
  if not s then return {'nowindow', tostring(now)} end
  local u = used(pool, key, now, rolling, s)
  local r = reserved(pool, key, now)
  if u + r + estimate > limit then
    return {'refused', epoch, i, u, r, tostring(s), tostring(e), tostring(now)}
  end
end
for i = 0, n - 1 do
  local pool, key = ARGV[5 + i * 5], ARGV[6 + i * 5]
  redis.call('HSET', P .. 'rsv:' .. pool .. ':' .. key, rid, estimate)
  redis.call('ZADD', P .. 'rexp:' .. pool .. ':' .. key, now + ttl, rid)
end
return {'admitted', epoch}
"""

# ARGV: reservation id ('' for none), tokens, response id ('' for none), n,
# then n x (pool, key, rolling seconds, windows). A response id counts once across every proxy.
_SETTLE = _LUA_COMMON + """
local rid, tokens, response, n = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now = now_s()
if response ~= '' and tokens > 0 then
  if not redis.call('SET', P .. 'resp:' .. response, '1', 'NX', 'EX', 30 * 86400) then tokens = 0 end
end
for i = 0, n - 1 do
  local pool, key, rolling, wins = ARGV[5 + i * 4], ARGV[6 + i * 4], tonumber(ARGV[7 + i * 4]), ARGV[8 + i * 4]
  if rid ~= '' then
    redis.call('HDEL', P .. 'rsv:' .. pool .. ':' .. key, rid)
    redis.call('ZREM', P .. 'rexp:' .. pool .. ':' .. key, rid)
  end
  count(pool, key, now, rolling, wins, tokens)
end
return 1
"""

# ARGV: n, then n x (pool, key, rolling seconds, windows); returns per scope used, reserved, start, end; then now.
_STATUS = _LUA_COMMON + """
local n = tonumber(ARGV[1])
local now = now_s()
local out = {}
for i = 0, n - 1 do
  local pool, key, rolling, wins = ARGV[2 + i * 4], ARGV[3 + i * 4], tonumber(ARGV[4 + i * 4]), ARGV[5 + i * 4]
  local s, e = window(now, rolling, wins)
  if not s then s, e = 0, 0 end
  table.insert(out, used(pool, key, now, rolling, s))
  table.insert(out, reserved(pool, key, now))
  table.insert(out, tostring(s))
  table.insert(out, tostring(e))
end
table.insert(out, tostring(now))
return out
"""

# KEYS: the reservation expiry sets; ARGV: ttl, then reservation ids. Refreshes only those still there.
_TOUCH = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for _, z in ipairs(KEYS) do
  for i = 2, #ARGV do
    if redis.call('ZSCORE', z, ARGV[i]) then redis.call('ZADD', z, expires, ARGV[i]) end
  end
end
return 1
"""

# ARGV: epoch, origin, n, then n x (pool, key, rolling seconds, windows, tokens, minute or '').
# Adds a database's rows of the current windows once per Redis epoch.
_REBUILD = _LUA_COMMON + """
if redis.call('GET', P .. 'epoch') ~= ARGV[1] then return -1 end
if not redis.call('SET', P .. 'rebuilt:' .. ARGV[1] .. ':' .. ARGV[2], '1', 'NX', 'EX', 40 * 86400) then return 0 end
local n = tonumber(ARGV[3])
local now = now_s()
for i = 0, n - 1 do
  local b = 4 + i * 6
  local pool, key, rolling, wins, tokens, minute = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2]), ARGV[b + 3],
    tonumber(ARGV[b + 4]), ARGV[b + 5]
  if rolling > 0 then
    local h = P .. 'roll:' .. pool .. ':' .. key .. ':' .. gen(pool, key)
    redis.call('HINCRBY', h, minute, tokens)
    redis.call('EXPIRE', h, math.floor(rolling) + 3600)
  else
    count(pool, key, now, rolling, wins, tokens)
  end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Settlement:
    """One trip of the settlement thread: a reservation goes, tokens count (scopes: (pool, key))."""

    owner: str  # reservation id, "" for none
    tokens: int
    response_id: str  # counted once across proxies; "" for none
    scopes: list[tuple[str, str | None]]
    previous: tuple[str, str | None, int, int] | None = None  # (response id, conversation, input, output)


def scope_key(key_id: str | None) -> str:
    return key_id or ""


def window_spec(pool: Pool | Window, tz, now: datetime) -> tuple[int, str]:
    """(rolling seconds, "start,end;..." of the windows around `now`) in epoch seconds.

    Calendar windows: the previous, current and next one by this host's clock;
    the script picks the one containing Redis's clock, so skews of less than a
    window agree.
    """
    window = pool.window if isinstance(pool, Pool) else pool
    if window.is_rolling:
        return int((window.rolling_hours or 0) * 3600), ""
    bounds = []
    start, end = window.bounds(now, tz)
    previous = window.bounds(start - timedelta(seconds=1), tz)
    following = window.bounds(end + timedelta(seconds=1), tz)
    for s, e in (previous, (start, end), following):
        bounds.append(f"{int(s.timestamp())},{int(e.timestamp())}")
    return 0, ";".join(bounds)


def _epoch_time(text: Any) -> datetime:
    return datetime.fromtimestamp(float(text), timezone.utc)


class RedisLedger:
    """Admission and counters shared through Redis; local SQLite only for what Datasette shows.

    Thread use matches the SQLite ledger: `admit_many`, `status`, `heartbeat`,
    `release_all` and `add_reset` run on the ledger thread; `admit_local`,
    `give_back` and `settle` are called from the event loop and never wait
    (settlements go to Redis from a thread of their own, in pipelines).
    """

    def __init__(self, url: str, path: str | Path, config: Config, clock: Callable[[], datetime] = utc_now,
                 client: redis.Redis | None = None, ttl: float = RESERVATION_TTL) -> None:
        self.url = url
        self.ttl = ttl
        self.path = Path(path)
        self.config = config
        self.clock = clock
        self.client = client or redis_rows.connect(url)
        self.process = f"{os.uname().nodename}:{os.getpid()}/{secrets.token_hex(4)}"
        self._seq = 0
        self._live: dict[str, float] = {}  # this process's reservations in flight: id -> time admitted
        self._live_lock = threading.Lock()
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)
        self._rebuild = self.client.register_script(_REBUILD)
        self._touch = self.client.register_script(_TOUCH)
        self._contributed: str | None = None  # the Redis epoch this database's rows were added to
        self._db: schema.sqlite_utils.Database | None = None
        # Settlements and releases on their way to Redis: (reservation id or "", tokens, scopes).
        self._ops: QueueWorker[Settlement] = QueueWorker("usage-redis-settle", handle=self._settle_batch,
                                                         failures=FailureLog(
            "usage: settling usage in Redis", logger=log,
            failing="usage: cannot settle usage in Redis ({error}); retrying every second",
            working="usage: settlements reach Redis again"))
        self._scopes: dict[str, tuple[tuple[str, str | None], ...]] = {}  # reservation id -> scopes it holds
        self._ops.start()

    # -- local database (pools for Datasette, alerts, rebuild) -----------
    @property
    def db(self) -> schema.sqlite_utils.Database:
        if self._db is None:
            db = schema.connect(self.path)
            schema.migrate(db)
            # Autocommit, as the SQLite ledger: an alert row must not leave a write transaction open.
            db.conn.isolation_level = None
            self._db = db
        return self._db

    def publish_pools(self) -> None:
        write_pools(self.db, self.config, self.clock())

    def close(self) -> None:
        self._ops.stop(10)
        if self._db is not None:
            self._db.conn.close()
            self._db = None
        self.client.close()

    # -- admission -------------------------------------------------------
    def admit_local(self, checks: list[Check], estimate: int) -> Decision | None:
        return None  # every admission is one script in Redis: no lease to take from

    def admit(self, checks: list[Check], estimate: int) -> Decision:
        return self.admit_many([(checks, estimate)])[0]

    def admit_many(self, requests: list[tuple[list[Check], int]]) -> list[Decision]:
        """One script per request, all in one pipeline (one round trip)."""
        now = self.clock()
        ids = [self._new_id() for _ in requests]
        results: list[Any] = [None] * len(requests)
        todo = list(range(len(requests)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for index in todo:
                checks, estimate = requests[index]
                args: list[Any] = [estimate, ids[index], self.ttl, len(checks)]
                for check in checks:
                    rolling, wins = window_spec(check.pool, self.config.timezone, now)
                    args += [check.pool.name, scope_key(check.key_id), check.limit, rolling, wins]
                self._admit(args=args, client=pipe)
            for index, result in zip(todo, pipe.execute(), strict=True):
                results[index] = result
            # A script that found no epoch decided nothing (and reserved nothing): Redis lost its data.
            todo = [index for index, result in enumerate(results) if result[0] == "rebuild"]
            if not todo:
                break
            if attempt == 1:
                raise redis.RedisError("Redis lost its counters and they could not be rebuilt")
            self.rebuild()
        if self._needs_rebuild(results):  # decided, but this database's rows are not in this epoch yet
            self.rebuild()
        decisions = []
        admitted_at = time.monotonic()
        for (checks, estimate), rid, result in zip(requests, ids, results, strict=True):
            kind = result[0]
            if kind == "admitted":
                with self._live_lock:
                    self._live[rid] = admitted_at
                    self._scopes[rid] = tuple((check.pool.name, check.key_id) for check in checks)
                decisions.append(Decision(True, None, estimate=estimate, owner=rid))
            elif kind == "refused":
                check = checks[int(result[2])]
                start, end = _epoch_time(result[5]), _epoch_time(result[6])
                rolling = check.pool.window.is_rolling
                decisions.append(Decision(False, None, check, int(result[3]), int(result[4]), estimate,
                                          None if rolling else end, start, "limit"))
            else:
                raise redis.RedisError(f"no window of pool {checks[0].pool.name} contains Redis's clock "
                                       f"({_epoch_time(result[1]).isoformat()}); is this host's clock a window off?")
        return decisions

    def _needs_rebuild(self, results: list[Any]) -> bool:
        epochs = {r[1] for r in results if r and r[0] in ("admitted", "refused")}
        return bool(epochs) and epochs != {self._contributed}

    def _new_id(self) -> str:
        self._seq += 1
        return f"{self.process}#{self._seq}"

    # -- settlement (event loop: queued, never waits) --------------------
    def give_back(self, reservation: int | None, estimate: int, owner: str) -> None:
        """An admitted request that will never be recorded: its reservation (named by `owner`) goes."""
        self._queue(Settlement(owner, 0, "", self._reserved_scopes(owner)))

    def record(self, row: dict[str, Any], reservation: Reservation | None) -> bool:
        """A finished call's row: its reservation goes and its tokens count in its pool and key, at once,
        once per response id across every proxy (one script, from the settlement thread). False: no debts
        wait here."""
        owner = reservation.owner if reservation is not None else None
        pool, key_id = row.get("pool"), row.get("key_id")
        tokens = row.get("total_tokens") or 0
        scopes = list(self._reserved_scopes(owner)) if owner else []
        if pool in self.config.pools:
            for scope in ((pool, None), (pool, key_id)) if key_id else ((pool, None),):
                if scope not in scopes:
                    scopes.append(scope)
        if not owner and (not scopes or tokens <= 0):
            return False
        previous = None
        if tokens and row.get("response_id"):
            previous = (row["response_id"], row.get("conversation"), row.get("input_tokens") or 0,
                        row.get("output_tokens") or 0)
        self._queue(Settlement(owner or "", max(int(tokens), 0), row.get("response_id") or "", scopes, previous))
        return False

    def _reserved_scopes(self, owner: str) -> list[tuple[str, str | None]]:
        with self._live_lock:
            return list(self._scopes.get(owner, ()))

    def _queue(self, op: Settlement) -> None:
        if op.owner:
            with self._live_lock:
                self._live.pop(op.owner, None)
                self._scopes.pop(op.owner, None)
        if self._ops.pending >= MAX_PENDING_OPS:
            log.error("usage: %d settlements wait for Redis; dropping this one", MAX_PENDING_OPS)
            return
        self._ops.put(op)

    def _settle_batch(self, batch: list[Settlement]) -> None:
        """Settlement thread: one pipeline per batch, tried again every second while Redis is away."""
        while batch:
            try:
                self._apply(batch)
                return
            except redis.RedisError as exc:
                self._ops.failures.failed(exc)
                if self._ops.stopping or self._ops.sleep(1.0):
                    return  # stopping: settlements Redis did not take are given up (their reservations expire)

    def _apply(self, batch: list[Settlement]) -> None:
        now = self.clock()
        pipe = self.client.pipeline(transaction=False)
        for op in batch:
            scopes = [scope for scope in op.scopes if scope[0] in self.config.pools]
            args: list[Any] = [op.owner, op.tokens, op.response_id, len(scopes)]
            for pool_name, key_id in scopes:
                rolling, wins = window_spec(self.config.pools[pool_name], self.config.timezone, now)
                args += [pool_name, scope_key(key_id), rolling, wins]
            self._settle(args=args, client=pipe)
            if op.previous is not None:  # for the estimate of a continuation on any proxy
                response_id, conversation, input_tokens, output_tokens = op.previous
                value = f"{input_tokens},{output_tokens}"
                pipe.set(f"{PREFIX}prev:{response_id}", value, ex=PREVIOUS_TTL)
                if conversation:
                    pipe.set(f"{PREFIX}conv:{conversation}", value, ex=PREVIOUS_TTL)
        pipe.execute()

    def previous_usage(self, response_id: str | None, conversation: str | None) -> PreviousUsage | None:
        """What the response a continuation builds on used, as any proxy recorded it (ledger thread)."""
        if response_id:
            name = f"{PREFIX}prev:{response_id}"
        elif conversation:
            name = f"{PREFIX}conv:{conversation}"
        else:
            return None
        value = self.client.get(name)
        if not value:
            return None
        input_tokens, _, output_tokens = value.partition(",")
        return PreviousUsage(int(input_tokens), int(output_tokens))

    # The SQLite ledger's lease bookkeeping has no counterpart here: usage goes to Redis as it settles.
    def landed(self, reservation: int | None, owner: str, used: int) -> None:
        pass

    def pay_debts(self) -> None:
        pass

    def give_up_crossed(self) -> None:
        pass

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued settlements reached Redis (tests, shutdown)."""
        return self._ops.flush(timeout)

    # -- housekeeping (ledger thread) ------------------------------------
    def release_idle(self, idle: float = 0.0) -> None:
        """No leases to give back in Redis."""

    def heartbeat(self) -> None:
        """Keep this process's reservations alive (expired ones of every proxy go at the next script),
        and add this database's rows when Redis lost its counters since the last look."""
        if self.client.get(f"{PREFIX}epoch") != self._contributed:
            self.rebuild()
        with self._live_lock:
            live = list(self._live)
        if not live:
            return
        keys = [scope_key(None)] + list(self.config.keys)
        sets = [f"{PREFIX}rexp:{pool}:{key}" for pool in self.config.pools for key in keys]
        self._touch(keys=sets, args=[self.ttl, *live])

    def release_all(self) -> None:
        with self._live_lock:
            live, self._live = list(self._live), {}
        for owner in live:
            self.give_back(None, 0, owner)
        self.flush(timeout=3.0)  # Redis away: they expire on their own

    def add_reset(self, pool: str, key_id: str | None = None, note: str | None = None) -> str:
        """Usage so far no longer counts: new counters for the pool (or key), for every proxy."""
        reset_shared(self.client, pool, key_id)
        return record_reset(self.db.conn, pool, key_id, note, self.clock())

    def status(self, forecast: bool = True) -> list[PoolStatus]:
        return shared_statuses(self.client, pool_status.config_scopes(self.config), self.clock())

    # -- markers shared by every proxy -----------------------------------
    def claim_alert(self, dedupe: str) -> bool:
        """True for the first proxy to fire this alert (pool, key, window, threshold)."""
        return bool(self.client.set(f"{PREFIX}alert:{dedupe}", "1", nx=True, ex=ALERT_MARKER_TTL))

    def claim_response(self, response_id: str) -> bool:
        """True the first time any proxy counts this response id."""
        return bool(self.client.set(f"{PREFIX}resp:{response_id}", "1", nx=True, ex=RESPONSE_MARKER_TTL))

    # -- a Redis that lost its data --------------------------------------
    def rebuild(self) -> None:
        """Redis restarted without persistence: add this database's rows of the current windows, once.

        The first proxy to notice sets a new epoch; every proxy then adds the
        rows of its own database (once per database and epoch, whichever of
        its processes gets there first). Requests in flight during the restart
        lose their reservations; their usage counts when they finish.
        """
        self.client.set(f"{PREFIX}epoch", secrets.token_hex(8), nx=True)
        epoch = self.client.get(f"{PREFIX}epoch")
        _, origin = redis_rows.outbox_cursor(self.db)
        args: list[Any] = [epoch, origin, 0]
        now = self.clock()
        entries = list(self._local_usage(now))
        args[2] = len(entries)
        for entry in entries:
            args += entry
        result = self._rebuild(args=args)
        if result == 1 and entries:
            log.warning("usage: Redis had lost its counters; added this database's usage of the current windows "
                        "(%d scopes)", len(entries))
        self._contributed = epoch

    def _local_usage(self, now: datetime) -> Iterable[list[Any]]:
        """[pool, key, rolling seconds, windows, tokens, minute] of this database's rows that count now."""
        conn = self.db.conn
        for pool in self.config.pools.values():
            rolling, wins = window_spec(pool, self.config.timezone, now)
            if pool.window.is_rolling:
                since = now - timedelta(seconds=rolling)
                sql = ("SELECT key_id, CAST(strftime('%s', substr(ts, 1, 19)) / 60 AS INTEGER), SUM(total_tokens) "
                       "FROM requests WHERE pool = ? AND ts >= ? AND total_tokens > 0 GROUP BY 1, 2")
                for key_id, minute, tokens in conn.execute(sql, [pool.name, iso_utc(since)]):
                    yield [pool.name, "", rolling, wins, int(tokens), str(minute)]
                    if key_id:
                        yield [pool.name, key_id, rolling, wins, int(tokens), str(minute)]
                continue
            start, end = pool.window.bounds(now, self.config.timezone)
            sql = ("SELECT key_id, SUM(total_tokens) FROM requests WHERE pool = ? AND ts >= ? AND ts < ? "
                   "AND total_tokens > 0 GROUP BY 1")
            total = 0
            for key_id, tokens in conn.execute(sql, [pool.name, iso_utc(start), iso_utc(end)]):
                total += int(tokens)
                if key_id:
                    yield [pool.name, key_id, rolling, wins, int(tokens), ""]
            if total:
                yield [pool.name, "", rolling, wins, total, ""]


def reset_shared(client: redis.Redis, pool: str, key_id: str | None = None) -> None:
    """A reset in Redis: the pool's (or key's) counters start anew for every proxy."""
    client.incr(f"{PREFIX}gen:{pool}" + (f":{key_id}" if key_id else ""))


def shared_statuses(client: redis.Redis, scopes: list[pool_status.Scope], now: datetime) -> list[PoolStatus]:
    """Every scope's used and reserved as Redis counts them (windows by Redis's clock; one script)."""
    args: list[Any] = [len(scopes)]
    for scope in scopes:
        rolling, wins = window_spec(scope.window, scope.tz, now)
        args += [scope.pool, scope_key(scope.key_id), rolling, wins]
    out = client.register_script(_STATUS)(args=args)
    result = []
    for i, scope in enumerate(scopes):
        used, reserved, start, end = out[i * 4: i * 4 + 4]
        rolling = scope.window.is_rolling
        result.append(PoolStatus(scope.pool, scope.key_id, scope.label, scope.window.kind, scope.limit, int(used),
                                 int(reserved), _epoch_time(start), None if rolling else _epoch_time(end),
                                 timezone=scope.tz.key))
    return result
