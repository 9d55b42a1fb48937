"""Token pools with limits: admission with reservations (leases), resets.

The counters live in SQLite so that several proxy processes on one database
share them. Admission is decided in short `BEGIN IMMEDIATE` transactions on
a dedicated thread (never on the event loop):

    used (rows of the window) + reserved (all proxies) + estimate <= limit

Each process holds one reservation row per pool (and key with its own
limit), its *lease*. An admission grows the lease by the request's estimate
and, while the pool is far from its limit, by some spare tokens: later
requests are admitted from the spare part in memory, without a transaction
(`admit_local`). The spare part is at most 1/16 of what is left in the
window and 1/64 of the limit; near the limit it is zero and every request
is decided in the database. When a request finishes, what its estimate had
too many becomes spare again (up to what the last decision allowed; the
rest goes back to the pool in the next transaction), and the writer thread
takes what it used off the lease in the same transaction that inserts its
row, so a request is always counted exactly once: as reserved, then as
used. Spare tokens no request asked for in LEASE_IDLE seconds go back to
the pool, and a refusal gives them back at once.

`used` is kept incrementally: the ledger remembers the last `requests.id` it
has seen and adds newer rows (from every process) to its per-window totals;
a new window or a reset recomputes the total once from the database.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlite_utils

from addon.config import Config, Pool
from addon.ledger import pool_status
from addon.ledger.estimate import PreviousUsage, estimate
from addon.ledger.pool_status import PoolStatus, parse_ts
from addon.metering.wire import RequestFacts
from addon.store import schema
from addon.windows import iso_utc, utc_now

log = logging.getLogger(__name__)

RESERVATION_TTL = 120.0  # seconds; live reservations are refreshed well before
HEARTBEAT_INTERVAL = 30.0
LEASE_SHARE = 16  # spare tokens of a lease: at most 1/16 of what is left ...
LEASE_LIMIT_SHARE = 64  # ... and 1/64 of the limit
LEASE_IDLE = 10.0  # seconds without an admission before spare tokens go back
OWN_ROWS = "substr(owner, 1, ?) = ?"  # with Ledger._own_rows(): a ledger's reservation rows
LEDGER_BUSY_TIMEOUT_MS = 2000
WINDOW_DAYS_AHEAD = 400

Clock = Callable[[], datetime]


# ---------------------------------------------------------------------------
# Estimates

def estimate_tokens(body_size: int, body: bytes | None, max_output_tokens: int | None, default_output: int,
                    endpoint: str) -> int:
    """The estimate of a request known only by its size and output cap (see estimate.estimate)."""
    facts = RequestFacts(input_chars=body_size, max_output_tokens=max_output_tokens)
    return estimate(facts, endpoint, _Defaults(default_output), None, body)


@dataclass(frozen=True, slots=True)
class _Defaults:
    estimate_output_tokens: int
    estimate_previous_tokens: int = 0


# ---------------------------------------------------------------------------
# Windows in the database


def window_rows(pool: Pool, tz, now: datetime, days_ahead: int = WINDOW_DAYS_AHEAD) -> list[dict[str, str]]:
    """Calendar windows of a pool from the current one to `days_ahead` on."""
    if pool.window.is_rolling:
        return []
    rows = []
    start, end = pool.window.bounds(now, tz)
    horizon = now + timedelta(days=days_ahead)
    while start < horizon:
        rows.append({"pool": pool.name, "start": iso_utc(start), "end": iso_utc(end)})
        start, end = pool.window.bounds(end + timedelta(seconds=1), tz)
    return rows


def write_pools(db: sqlite_utils.Database, config: Config, now: datetime | None = None) -> None:
    """Publish the configured pools and their windows for SQL readers (Datasette)."""
    now = now or utc_now()
    stamp = iso_utc(now)
    with db.conn:
        db.execute("DELETE FROM pools")
        db.execute("DELETE FROM pool_windows")
        db.execute("DELETE FROM key_limits")
        db.table("pools").insert_all(
            [
                {
                    "name": pool.name,
                    "limit": pool.limit,
                    "window": pool.window.kind,
                    "rolling_hours": pool.window.rolling_hours,
                    "timezone": config.timezone_name,
                    "models": json.dumps(list(pool.models)),
                    "thresholds": json.dumps(list(pool.thresholds)),
                    "fail": pool.fail,
                    "updated_at": stamp,
                }
                for pool in config.pools.values()
            ]
        )
        # Keys with their own limits, so that status, top and Datasette report them without the config.
        db.table("key_limits").insert_all(
            {"pool": pool, "key_id": rule.key_id, "label": rule.label, "limit": limit}
            for rule in config.keys.values() for pool, limit in rule.limits.items()
        )
        # Keep a day of past windows so "today" still resolves just after start-up.
        for pool in config.pools.values():
            db.table("pool_windows").insert_all(window_rows(pool, config.timezone, now - timedelta(days=1)))


# ---------------------------------------------------------------------------
# Counting


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
class Counter:
    """Tokens used in the current window of one pool (and key)."""

    start: datetime  # effective start: window start or a later reset
    end: datetime
    window_start: datetime
    total: int = 0
    # Rolling windows: (epoch, tokens) of counted rows, oldest first.
    events: deque = field(default_factory=deque)


@dataclass(slots=True)
class Lease:
    """This process's reservation row for one scope (pool, key with its own limit)."""

    id: int | None = None
    spare: int = 0  # reserved in the database, promised to no request yet
    used_at: float = 0.0  # time.monotonic() of the last admission from it
    owner: str | None = None  # the row's owner: this ledger's prefix plus a number of its own
    cap: int = 0  # the spare the last decision in the database allowed (none near the limit)
    # Reserved in the database for nobody: given back in the next transaction.
    # Negative: a debt, usage beyond estimates that the row must take on.
    excess: int = 0
    # Tokens left beyond every reservation at the last decision in the
    # database (the tightest of the scope's checks); usage beyond estimates
    # eats it, and when it is gone the spare tokens are given up.
    room: int = 0

    def copy(self) -> Lease:
        return Lease(self.id, self.spare, self.used_at, self.owner, self.cap, self.excess, self.room)

    def same_row(self, other: Lease) -> bool:
        return self.id == other.id and self.owner == other.owner

    def forget(self) -> None:
        """Its row is gone (expired): nothing it held is reserved any more."""
        self.id = self.owner = None
        self.spare = self.excess = 0


def lease_scope(checks: list[Check]) -> tuple[str, str | None]:
    return checks[0].pool.name, next((c.key_id for c in checks if c.key_id), None)


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
    owner: str | None = None  # when admitted: the reservation row's owner
    held: int = 0  # when refused: spare tokens other proxies hold for their next requests


class Ledger:
    """Admission and counters over one SQLite connection, used by one thread."""

    def __init__(self, path: str | Path, config: Config, clock: Clock = utc_now, owner: str | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self.clock = clock
        # Reservation rows are this ledger's when their owner starts with
        # `owner` + "#"; each lease row has an owner of its own. SQLite reuses
        # the ids of deleted rows, and a process reconfigures or reopens a
        # moved database: a row that lands late must never take tokens off
        # another lease, so rows are matched by (id, owner).
        self.process = owner or f"{os.uname().nodename}:{os.getpid()}"
        self.owner = f"{self.process}/{secrets.token_hex(4)}"
        self._lease_seq = 0
        self._db: sqlite_utils.Database | None = None
        self._file: tuple[int, int] | None = None
        self._moved = False
        self._last_id = 0
        self._last_reset_id: int | None = None
        self._resets: dict[tuple[str, str | None], list[datetime]] = {}
        self._counters: dict[tuple[str, str | None], Counter] = {}
        # Leases are read and taken from by the event loop (admit_local) and
        # grown by the ledger thread: a lock, held for memory updates only.
        self._leases: dict[tuple[str, str | None], Lease] = {}
        self._lease_lock = threading.Lock()
        # Usage of finished requests whose rows are not written yet, by the
        # (id, owner) of the lease row that holds it until they are.
        self._unlanded: dict[tuple[int, str], int] = {}
        self._confirmed = 0.0  # time.time() of the last transaction that saw the leases alive

    # -- connection ------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        if self._db is not None and schema.moved(self._db, self.path):
            # Deleted or moved: counting on in the old file would be invisible
            # to every other reader; start over on the file at the path.
            log.warning("usage: database %s was deleted or moved; the ledger reopens it", self.path)
            self._reset_connection()
            self._moved = True
            with self._lease_lock:  # their rows stay in the old file
                self._leases.clear()
                self.owner = f"{self.process}/{secrets.token_hex(4)}"
        if self._db is None and self._moved and not self.path.exists():
            # The writer recreates it (after moving the old WAL out of the
            # way); creating it here could pair a new file with the old WAL.
            raise sqlite3.OperationalError(f"database {self.path} is missing")
        if self._db is None:
            db = schema.connect(self.path)
            db.conn.execute(f"PRAGMA busy_timeout = {LEDGER_BUSY_TIMEOUT_MS}")
            db.conn.isolation_level = None  # explicit BEGIN IMMEDIATE / COMMIT
            schema.migrate(db)
            self._db = db
            self._file = schema.file_id(self.path)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None

    def _reset_connection(self) -> None:
        try:
            self.close()
        except sqlite3.Error:
            self._db = None
        self._counters.clear()
        self._last_id = 0
        self._last_reset_id = None

    def publish_pools(self) -> None:
        db = self.db
        db.conn.isolation_level = "DEFERRED"
        try:
            write_pools(db, self.config, self.clock())
        finally:
            db.conn.isolation_level = None

    # -- admission -------------------------------------------------------
    def admit_local(self, checks: list[Check], estimate: int) -> Decision | None:
        """Admit from this process's lease, in memory; None when it cannot.

        Safe to call from the event loop: no database, no waiting.
        """
        scope = lease_scope(checks)
        with self._lease_lock:
            lease = self._leases.get(scope)
            if lease is None or lease.id is None or lease.spare < estimate:
                return None
            if time.time() - self._confirmed > 2 * HEARTBEAT_INTERVAL:
                return None  # the row may have expired meanwhile (a suspended machine): a transaction checks
            lease.spare -= estimate
            lease.used_at = time.monotonic()
            return Decision(True, lease.id, estimate=estimate, owner=lease.owner)

    def give_back(self, reservation: int, estimate: int, owner: str) -> None:
        """An admitted request that will never be recorded: its tokens are spare again."""
        with self._lease_lock:
            for lease in self._leases.values():
                if lease.id == reservation and lease.owner == owner:
                    lease.spare += estimate
                    return
            # Else a lease replaced since, or of an earlier configuration or
            # file: its row expires on its own.

    def settle(self, reservation: int, owner: str, estimate: int, used: int) -> int:
        """A request finished using `used` tokens: what its row must take off the lease.

        Its usage counts at once, not when its row lands: the lease row holds
        it until then. When it used less than its estimate, the difference
        is spare again at once, up to the spare the last decision in the
        database allowed (none near the limit, where it would be held against
        other processes); the rest goes back to the pool in the next
        transaction. When it used more, the lease's spare tokens pay for the
        difference and the rest is added to the row in the next transaction;
        and once the difference has eaten the room the last decision saw,
        the limit is crossed: the spare tokens go back, so that nothing more
        is admitted without asking the database.
        """
        with self._lease_lock:
            for lease in self._leases.values():
                if lease.id == reservation and lease.owner == owner:
                    break
            else:
                return estimate  # a lease replaced since: its row expires on its own
            if used and owner is not None:
                self._unlanded[(reservation, owner)] = self._unlanded.get((reservation, owner), 0) + used
            if used <= estimate:
                kept = min(estimate - used, max(lease.cap - lease.spare, 0))
                lease.spare += kept
                lease.excess += estimate - used - kept
                return used
            over = used - estimate
            paid = min(over, lease.spare)
            lease.spare -= paid
            lease.excess -= over - paid
            lease.room -= over
            if lease.room < 0 and lease.spare:
                lease.excess += lease.spare
                lease.spare = lease.cap = 0
            return used

    def unforeseen(self, pool: str, used: int) -> None:
        """Usage no admission reserved (a background response or a batch read back): it eats the
        room of this process's leases in the pool; a lease without room gives its spare up."""
        with self._lease_lock:
            for (lease_pool, _), lease in self._leases.items():
                if lease_pool == pool and lease.id is not None:
                    lease.room -= used
                    if lease.room < 0 and lease.spare:
                        lease.excess += lease.spare
                        lease.spare = lease.cap = 0

    def landed(self, reservation: int, owner: str, used: int) -> None:
        """The row of a settled request is written (writer thread): its usage is in the rows now."""
        scope = (reservation, owner)
        with self._lease_lock:
            left = self._unlanded.get(scope, 0) - used
            if left > 0:
                self._unlanded[scope] = left
            else:
                self._unlanded.pop(scope, None)

    def has_debt(self) -> bool:
        with self._lease_lock:
            return any(lease.excess < 0 for lease in self._leases.values())

    def admit(self, checks: list[Check], estimate: int) -> Decision:
        """Reserve `estimate` tokens against every check, or refuse."""
        return self.admit_many([(checks, estimate)])[0]

    def admit_many(self, requests: list[tuple[list[Check], int]]) -> list[Decision]:
        """Decide several admissions, in order, in one transaction.

        Requests that arrived together share one `BEGIN IMMEDIATE`: each sees
        the reservations of those decided before it.
        """
        now = self.clock()
        created = time.time()
        pools = {checks[0].pool.name for checks, _ in requests}
        # The spare tokens of every lease in these pools move into this
        # transaction: the event loop cannot promise them meanwhile, they
        # count as this process's own, and a rollback puts them back.
        with self._lease_lock:
            for checks, _ in requests:
                self._leases.setdefault(lease_scope(checks), Lease())
            taken = {scope: lease.copy() for scope, lease in self._leases.items() if scope[0] in pools}
            for scope in taken:
                self._leases[scope].spare = self._leases[scope].excess = 0
        work = {scope: lease.copy() for scope, lease in taken.items()}
        decisions: list[Decision] = []
        try:
            with self._immediate():
                self._refresh(now)
                reserved, ours, others = self._reserved()
                for scope, lease in work.items():
                    if lease.id is not None and (lease.id, lease.owner) not in ours:
                        lease.forget()  # expired (a long suspension): a new one
                    elif lease.excess:
                        self._grow(lease, -lease.excess, scope, reserved, created)
                        lease.excess = 0
                with self._lease_lock:  # the other pools' leases: still there?
                    for scope, lease in self._leases.items():
                        if scope not in work and lease.id is not None and (lease.id, lease.owner) not in ours:
                            lease.forget()
                for checks, estimate in requests:
                    decisions.append(self._decide(checks, estimate, now, reserved, work, created, others))
                # Other processes see what of each lease is spare (status: in flight vs held).
                self.db.conn.executemany("UPDATE reservations SET spare = ? WHERE id = ? AND owner = ?",
                                         [(lease.spare, lease.id, lease.owner) for lease in work.values()
                                          if lease.id is not None])
        except BaseException as exc:
            with self._lease_lock:
                for scope, lease in taken.items():
                    current = self._leases.get(scope)
                    if current is not None and current.same_row(lease):  # else the database was moved
                        current.spare += lease.spare
                        current.excess += lease.excess
            if isinstance(exc, sqlite3.Error):
                self._reset_connection()
            raise
        self._confirmed = created
        moment = time.monotonic()
        with self._lease_lock:
            for scope, lease in work.items():
                current = self._leases.setdefault(scope, Lease())
                if not current.same_row(lease):
                    # A new row: what was given back meanwhile belonged to the old one.
                    current.id, current.owner, current.spare, current.excess = lease.id, lease.owner, lease.spare, 0
                    current.room = lease.room
                else:
                    current.spare += lease.spare
                    # Usage beyond estimates settled meanwhile still eats the new room.
                    current.room = lease.room + current.room - taken[scope].room
                current.cap = lease.cap
            for (checks, _), decision in zip(requests, decisions, strict=True):
                if decision.admitted:
                    self._leases[lease_scope(checks)].used_at = moment
        return decisions

    def _decide(self, checks: list[Check], estimate: int, now: datetime,
                reserved: dict[tuple[str, str | None], int], work: dict[tuple[str, str | None], Lease],
                created: float, others: dict[tuple[str, str | None], int]) -> Decision:
        scope = lease_scope(checks)
        lease = work[scope]
        never = never_fits(checks, estimate)
        if never is not None:  # refused whatever is used: the lease stays as it is
            counter = self._counter(never.pool, never.key_id, now)
            return Decision(False, None, never, counter.total, 0, estimate, None, counter.start, "never")
        if lease.spare and any(self._counter(c.pool, c.key_id, now).total + reserved.get((c.pool.name, c.key_id), 0)
                               > c.limit for c in checks):
            # Usage beyond estimates crossed the limit: nothing more from spare tokens.
            self._grow(lease, -lease.spare, scope, reserved, created)
            lease.spare = lease.cap = 0
        if lease.id is not None and lease.spare >= estimate:
            lease.spare -= estimate
            return Decision(True, lease.id, estimate=estimate, owner=lease.owner)
        # This process's spare in the pool's other scopes (other keys) goes
        # back first: it must not be held against this request, nor be
        # promised twice.
        for other_scope, other in work.items():
            if other_scope != scope and other_scope[0] == scope[0] and other.spare:
                self._grow(other, -other.spare, other_scope, reserved, created)
                other.spare = other.cap = 0
        room: int | None = None
        free: int | None = None
        for check in checks:
            counter = self._counter(check.pool, check.key_id, now)
            # The lease's own spare tokens are its to use: only the rest is held.
            held = reserved.get((check.pool.name, check.key_id), 0) - lease.spare
            left = check.limit - counter.total - held
            if estimate > left:
                # Near the limit, spare tokens serve whoever asks next.
                if lease.spare:
                    self._grow(lease, -lease.spare, scope, reserved, created)
                lease.spare = lease.cap = 0
                used, in_flight, elsewhere = self._shown(check, counter.total, reserved, others)
                return Decision(False, None, check, used, in_flight, estimate,
                                None if check.pool.window.is_rolling else counter.end, counter.start, "limit",
                                held=elsewhere)
            share = min((left - estimate) // LEASE_SHARE, check.limit // LEASE_LIMIT_SHARE)
            room = share if room is None else min(room, share)
            free = left - estimate if free is None else min(free, left - estimate)
        # Spare tokens only when they cover at least one more such request:
        # smaller ones would be held for nothing.
        spare = room if room is not None and room >= estimate else 0
        self._grow(lease, estimate + spare - lease.spare, scope, reserved, created)
        lease.spare = lease.cap = spare
        lease.room = (free or 0) - spare
        return Decision(True, lease.id, estimate=estimate, owner=lease.owner)

    def _shown(self, check: Check, rows: int, reserved: dict[tuple[str, str | None], int],
               others: dict[tuple[str, str | None], int]) -> tuple[int, int, int]:
        """(used, reserved by requests in flight, spare held by other proxies) of a check, as a person reads them.

        Used counts this process's finished requests whose rows are not
        written yet; this process's spare and leftover tokens are no request's.
        """
        scope = (check.pool.name, check.key_id)
        unlanded = spare = 0
        with self._lease_lock:
            for (pool, key), lease in self._leases.items():
                if pool == check.pool.name and (check.key_id is None or key == check.key_id) and lease.owner:
                    unlanded += self._unlanded.get((lease.id or 0, lease.owner), 0)
                    spare += lease.spare + max(lease.excess, 0)
        elsewhere = others.get(scope, 0)
        in_flight = reserved.get(scope, 0) - unlanded - spare - elsewhere
        return rows + unlanded, max(in_flight, 0), elsewhere

    def _grow(self, lease: Lease, delta: int, scope: tuple[str, str | None],
              reserved: dict[tuple[str, str | None], int], created: float) -> None:
        """Add `delta` tokens (may be negative) to the lease's row, creating it if needed."""
        pool, key = scope
        conn = self.db.conn
        if lease.id is None:
            self._lease_seq += 1
            lease.owner = f"{self.owner}#{self._lease_seq}"
            cursor = conn.execute(
                "INSERT INTO reservations (pool, key_id, tokens, created, expires, owner) VALUES (?, ?, ?, ?, ?, ?)",
                (pool, key, max(delta, 0), created, created + RESERVATION_TTL, lease.owner),
            )
            assert cursor.lastrowid is not None  # an INSERT's row
            lease.id = cursor.lastrowid
        elif delta:
            conn.execute("UPDATE reservations SET tokens = MAX(tokens + ?, 0), expires = ? WHERE id = ? AND owner = ?",
                         (delta, created + RESERVATION_TTL, lease.id, lease.owner))
        # Later requests of the same batch see this (as _reserved would).
        reserved[(pool, None)] = reserved.get((pool, None), 0) + delta
        if key is not None:
            reserved[(pool, key)] = reserved.get((pool, key), 0) + delta

    def give_up_crossed(self) -> None:
        """Spare tokens of scopes whose used + reserved crossed a limit (another
        process's usage beyond its estimates, say) are given up, so that nothing
        more is admitted from memory; `release_idle` hands them back."""
        with self._lease_lock:
            candidates = [scope for scope, lease in self._leases.items() if lease.spare and lease.id is not None]
        if not candidates:
            return
        now = self.clock()
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            self._refresh(now)
            reserved, _, _ = self._reserved()
            crossed = []
            for pool_name, key_id in candidates:
                pool = self.config.pools.get(pool_name)
                if pool is None:
                    continue
                limits: list[tuple[str | None, int | None]] = [(None, pool.limit)]
                rule = self.config.keys.get(key_id or "")
                if key_id is not None and rule is not None and pool_name in rule.limits:
                    limits.append((key_id, rule.limits[pool_name]))
                if any(limit is not None and self._counter(pool, key, now).total + reserved.get((pool_name, key), 0)
                       > limit for key, limit in limits):
                    crossed.append((pool_name, key_id))
        finally:
            conn.execute("COMMIT")
        with self._lease_lock:
            for scope in crossed:
                lease = self._leases.get(scope)
                if lease is not None and lease.spare:
                    lease.excess += lease.spare
                    lease.spare = lease.cap = 0

    def previous_usage(self, response_id: str | None, conversation: str | None) -> PreviousUsage | None:
        """What the response a continuation builds on used, as any proxy on this database recorded it
        (for a conversation: its latest response). Ledger thread only."""
        if response_id:
            sql, key = "response_id = ?", response_id
        elif conversation:
            sql, key = "conversation = ?", conversation
        else:
            return None
        row = self.db.conn.execute(
            f"SELECT input_tokens, output_tokens FROM requests WHERE {sql} AND total_tokens IS NOT NULL"
            " ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        if row is None:
            return None
        return PreviousUsage(int(row[0] or 0), int(row[1] or 0))

    def release_idle(self, idle: float = LEASE_IDLE) -> None:
        """Spare tokens of leases no request used lately go back to the pool,
        and what finished requests left over (`excess`) in every lease."""
        moment = time.monotonic()
        freed: list[tuple[Lease, Lease, int]] = []
        with self._lease_lock:
            for lease in self._leases.values():
                if lease.id is None:
                    continue
                idle_spare = lease.spare if moment - lease.used_at >= idle else 0
                if idle_spare or lease.excess:
                    freed.append((lease, lease.copy(), idle_spare))
                    lease.spare -= idle_spare
                    lease.excess = 0
        if not freed:
            return
        try:
            with self._immediate() as conn:
                conn.executemany(
                    "UPDATE reservations SET tokens = MAX(tokens - ?, 0), spare = MAX(COALESCE(spare, 0) - ?, 0)"
                    " WHERE id = ? AND owner = ?",
                    [(spare + row.excess, spare, row.id, row.owner) for _, row, spare in freed])
        except BaseException:
            with self._lease_lock:
                for lease, row, spare in freed:
                    if lease.same_row(row):
                        lease.spare += spare
                        lease.excess += row.excess
            raise

    def release_all(self) -> None:
        """Graceful stop, every row written: this process's reservations go."""
        with self._lease_lock:
            self._leases.clear()
        with self._immediate() as conn:
            conn.execute(f"DELETE FROM reservations WHERE {OWN_ROWS}", self._own_rows(whole_process=True))

    def _own_rows(self, whole_process: bool = False) -> tuple[int, str]:
        """Parameters of OWN_ROWS: this ledger's reservation rows, or those of
        every ledger this process had (before a reconfiguration)."""
        prefix = self.process + "/" if whole_process else self.owner + "#"
        return len(prefix), prefix

    def heartbeat(self) -> None:
        """Keep this process's live reservations; expire abandoned ones."""
        now = time.time()
        with self._immediate() as conn:
            # Only rows still alive: one that expired may already be counted
            # on by others. Rows of this process's earlier configurations too:
            # their requests in flight still hold them.
            conn.execute(f"UPDATE reservations SET expires = ? WHERE {OWN_ROWS} AND expires > ?",
                         (now + RESERVATION_TTL, *self._own_rows(whole_process=True), now))
            conn.execute("DELETE FROM reservations WHERE expires <= ?", (now,))
            alive = set(conn.execute(f"SELECT id, owner FROM reservations WHERE {OWN_ROWS}",
                                     self._own_rows()).fetchall())
        with self._lease_lock:
            for lease in self._leases.values():
                if lease.id is not None and (lease.id, lease.owner) not in alive:
                    lease.forget()  # expired while this process was suspended
        self._confirmed = now

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (waits, never fails on a stale snapshot)."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- counters --------------------------------------------------------
    def _reserved(self) -> tuple[dict[tuple[str, str | None], int], set[tuple[int, str]],
                                 dict[tuple[str, str | None], int]]:
        """Live reservations of every process by (pool, key), (id, owner) of this ledger's,
        and the spare tokens other processes' leases held at their last transaction."""
        totals: dict[tuple[str, str | None], int] = {}
        others: dict[tuple[str, str | None], int] = {}
        ours: set[tuple[int, str]] = set()
        _, prefix = self._own_rows()
        rows = self.db.conn.execute(
            "SELECT id, pool, key_id, tokens, owner, spare FROM reservations WHERE expires > ?", (time.time(),)
        ).fetchall()
        for row_id, pool, key, tokens, owner, spare in rows:
            mine = bool(owner and owner.startswith(prefix))
            for scope in ((pool, None), (pool, key)) if key is not None else ((pool, None),):
                totals[scope] = totals.get(scope, 0) + (tokens or 0)
                if not mine:
                    others[scope] = others.get(scope, 0) + min(spare or 0, tokens or 0)
            if mine:
                ours.add((row_id, owner))
        return totals, ours, others

    def _refresh(self, now: datetime) -> None:
        """Take in resets and rows written since the last look (any process)."""
        conn = self.db.conn
        (reset_id,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM resets").fetchone()
        if reset_id != self._last_reset_id:
            self._resets = pool_status.latest_resets(conn)
            self._last_reset_id = reset_id
            self._counters.clear()  # recompute with the new anchors
        if not self._counters:
            (self._last_id,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()
            return
        rows = conn.execute(
            "SELECT id, ts, pool, key_id, total_tokens FROM requests WHERE id > ? ORDER BY id", (self._last_id,)
        ).fetchall()
        if rows:
            self._last_id = rows[-1][0]
        for _id, ts, pool, key, tokens in rows:
            if tokens is None:
                continue
            try:
                moment = parse_ts(ts)
            except (TypeError, ValueError):
                continue
            for scope in ((pool, None), (pool, key)) if key else ((pool, None),):
                counter = self._counters.get(scope)
                if counter is not None and counter.start <= moment < counter.end:
                    counter.total += tokens
                    if self._is_rolling(pool):
                        counter.events.append((moment.timestamp(), tokens))

    def _is_rolling(self, pool_name: str) -> bool:
        pool = self.config.pools.get(pool_name)
        return bool(pool and pool.window.is_rolling)

    def _counter(self, pool: Pool, key_id: str | None, now: datetime) -> Counter:
        scope = (pool.name, key_id)
        counter = self._counters.get(scope)
        window = pool.window
        if counter is not None:
            if window.is_rolling:
                # Slide: drop what fell out of the window.
                horizon = (now - timedelta(hours=window.rolling_hours or 0)).timestamp()
                while counter.events and counter.events[0][0] < horizon:
                    counter.total -= counter.events.popleft()[1]
                counter.end = now + timedelta(days=3650)
                return counter
            if now < counter.end:
                return counter
        counter = self._load(pool, key_id, now)
        self._counters[scope] = counter
        return counter

    def effective_start(self, pool: Pool, key_id: str | None, now: datetime) -> tuple[datetime, datetime, datetime]:
        """(counting start, window end, window start) with resets applied."""
        return pool_status.counting_bounds(pool.window, self.config.timezone, now, self._resets, pool.name, key_id)

    def _load(self, pool: Pool, key_id: str | None, now: datetime) -> Counter:
        start, end, window_start = self.effective_start(pool, key_id, now)
        counter = Counter(start, end, window_start)
        if pool.window.is_rolling:
            counter.end = now + timedelta(days=3650)  # open-ended; rows are evicted as they age
        sql = "SELECT ts, total_tokens FROM requests WHERE pool = ? AND ts >= ? AND ts < ? AND total_tokens IS NOT NULL"
        params: list[Any] = [pool.name, iso_utc(start), iso_utc(end if not pool.window.is_rolling else counter.end)]
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        if pool.window.is_rolling:
            for ts, tokens in self.db.conn.execute(sql + " ORDER BY ts", params):
                counter.events.append((parse_ts(ts).timestamp(), tokens))
                counter.total += tokens
        else:
            counter.total = pool_status.used_in(self.db.conn, pool.name, key_id, start, end)
        return counter

    # -- resets and status ---------------------------------------------
    def add_reset(self, pool: str, key_id: str | None = None, note: str | None = None) -> str:
        return record_reset(self.db.conn, pool, key_id, note, self.clock())

    def status(self, forecast: bool = True) -> list[PoolStatus]:
        """Every pool (and every key with its own limit) as of now, as pool_status computes it for everyone,
        with this ledger's counters for `used` (no recount); `forecast=False` skips exhausted_at."""
        now = self.clock()
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            self._refresh(now)
            reserved, _, others = self._reserved()

            def counted(scope: pool_status.Scope, start: datetime, end: datetime | None) -> int:
                return self._counter(self.config.pools[scope.pool], scope.key_id, now).total

            result = pool_status.statuses(conn, pool_status.config_scopes(self.config), now, resets=self._resets,
                                          counted=counted, forecast=forecast)
            # The database's picture, refined by what only this process knows: its finished requests whose
            # rows are on their way count as used, its leases' spare tokens are held for no request.
            for status in result:
                check = Check(self.config.pools[status.pool], status.limit or 0, status.key_id)
                rows = status.used
                used, in_flight, elsewhere = self._shown(check, rows, reserved, others)
                own_spare = reserved.get((status.pool, status.key_id), 0) - in_flight - elsewhere - (used - rows)
                status.used, status.reserved, status.held = used, in_flight, max(own_spare, 0) + elsewhere
                if forecast:
                    status.exhausted_at = pool_status.exhaustion(status.remaining, status.pace_per_hour, now,
                                                                 status.resets_at)
            return result
        finally:
            conn.execute("COMMIT")


def record_reset(conn: sqlite3.Connection, pool: str, key_id: str | None, note: str | None, now: datetime) -> str:
    """A reset anchor: usage before `now` no longer counts in the pool's (or key's) window."""
    stamp = iso_utc(now)
    conn.execute("INSERT INTO resets (ts, pool, key_id, note) VALUES (?, ?, ?, ?)", (stamp, pool, key_id, note))
    return stamp


# ---------------------------------------------------------------------------
# Checks for a request


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

