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

`used` is kept incrementally (counters.py). The pieces: leases.py (the
leases in memory), reservations.py (their rows' SQL), counters.py (used in
the window), policy.py (the pure rules), published.py (pools, windows and
resets for readers); this module holds the connection and the decisions.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from addon.config import Config
from addon.ledger import pool_status, reservations
from addon.ledger.counters import Counter, WindowCounters
from addon.ledger.estimate import PreviousUsage
from addon.ledger.leases import LEASE_IDLE, LEASE_LIMIT_SHARE, LEASE_SHARE, Lease, Leases, LeaseScope, lease_scope
from addon.ledger.policy import Check, Decision, never_fits
from addon.ledger.pool_status import PoolStatus
from addon.ledger.published import record_reset, write_pools
from addon.ledger.reservations import HEARTBEAT_INTERVAL
from addon.store import schema
from addon.store.inserts import Reservation
from addon.windows import utc_now

log = logging.getLogger(__name__)

LEDGER_BUSY_TIMEOUT_MS = 2000

Clock = Callable[[], datetime]


class Ledger:
    """Admission and counters over one SQLite connection, used by one thread (leases: any thread)."""

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
        self.counters = WindowCounters(config)
        # Read and taken from by the event loop (admit_local), grown by the ledger thread.
        self.leases = Leases(stale_after=2 * HEARTBEAT_INTERVAL)

    # -- connection ------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        if self._db is not None and schema.moved(self._db, self.path):
            # Deleted or moved: counting on in the old file would be invisible
            # to every other reader; start over on the file at the path.
            log.warning("usage: database %s was deleted or moved; the ledger reopens it", self.path)
            self._reset_connection()
            self._moved = True
            self.leases.clear()  # their rows stay in the old file
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
        self.counters.clear()

    def publish_pools(self) -> None:
        db = self.db
        db.conn.isolation_level = "DEFERRED"
        try:
            write_pools(db, self.config, self.clock())
        finally:
            db.conn.isolation_level = None

    def _immediate(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction that takes the lock up front (waits, never fails on a stale snapshot)."""
        return schema.immediate(self.db.conn)

    def _own_prefix(self, whole_process: bool = False) -> str:
        """The owner prefix of this ledger's reservation rows, or of those of every ledger this process had
        (before a reconfiguration)."""
        return self.process + "/" if whole_process else self.owner + "#"

    # -- in memory (event loop, writer thread) ---------------------------
    def admit_local(self, checks: list[Check], estimate: int) -> Decision | None:
        """Admit from this process's lease, in memory; None when it cannot.

        Safe to call from the event loop: no database, no waiting.
        """
        return self.leases.admit_local(checks, estimate)

    def give_back(self, reservation: int | None, estimate: int, owner: str) -> None:
        """An admitted request that will never be recorded: its tokens are spare again."""
        self.leases.give_back(reservation, estimate, owner)

    def settle(self, reservation: int | None, owner: str, estimate: int, used: int) -> int:
        """A request finished using `used` tokens: what its row must take off the lease (Leases.settle)."""
        return self.leases.settle(reservation, owner, estimate, used)

    def unforeseen(self, pool: str, used: int) -> None:
        """Usage no admission reserved: it eats the room of this process's leases in the pool."""
        self.leases.unforeseen(pool, used)

    def landed(self, reservation: int | None, owner: str, used: int) -> None:
        """The row of a settled request is written (writer thread): its usage is in the rows now."""
        self.leases.landed(reservation, owner, used)

    def has_debt(self) -> bool:
        return self.leases.has_debt()

    def record(self, row: dict[str, Any], reservation: Reservation | None) -> bool:
        """A finished call's row, before the writer has it: its usage counts against its lease now.

        The row carries what the writer takes off the lease in the transaction
        that inserts it (`_reservation`, and `_settled` when the lease counts
        the usage until the row lands). True when usage beyond the estimate
        waits in memory: `pay_debts` on the ledger thread writes it.
        """
        used = row.get("total_tokens") or 0
        if reservation is None:
            if used and row.get("pool"):
                self.unforeseen(row["pool"], used)
            return False
        held = reservation.tokens
        if reservation.owner is not None:
            held = self.settle(reservation.id, reservation.owner, reservation.tokens, used)
            if used and held == used:
                row["_settled"] = used
        row["_reservation"] = Reservation(reservation.id, held, reservation.owner)
        return reservation.owner is not None and used > reservation.tokens

    def pay_debts(self) -> None:
        """Usage beyond estimates goes into the database now, not at the next admission (ledger thread)."""
        if self.has_debt():
            self.release_idle()

    # -- admission (ledger thread) ---------------------------------------
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
        # The spare tokens of every lease in these pools move into this
        # transaction: the event loop cannot promise them meanwhile, they
        # count as this process's own, and a rollback puts them back.
        taken = self.leases.take([lease_scope(checks) for checks, _ in requests])
        work = {scope: lease.copy() for scope, lease in taken.items()}
        decisions: list[Decision] = []
        try:
            with self._immediate() as conn:
                self.counters.refresh(conn)
                reserved, ours, others = reservations.live(conn, self._own_prefix())
                for scope, lease in work.items():
                    if lease.id is not None and (lease.id, lease.owner) not in ours:
                        lease.forget()  # expired (a long suspension): a new one
                    elif lease.excess:
                        self._grow(lease, -lease.excess, scope, reserved, created)
                        lease.excess = 0
                self.leases.forget_gone(ours, skip=work)  # the other pools' leases: still there?
                for checks, estimate in requests:
                    decisions.append(self._decide(checks, estimate, now, reserved, work, created, others))
                reservations.publish_spare(conn, list(work.values()))
        except BaseException as exc:
            self.leases.put_back(taken)
            if isinstance(exc, sqlite3.Error):
                self._reset_connection()
            raise
        self.leases.confirmed = created
        self.leases.merge(work, taken, [lease_scope(checks) for (checks, _), decision
                                        in zip(requests, decisions, strict=True) if decision.admitted])
        return decisions

    def _counter(self, check: Check, now: datetime) -> Counter:
        return self.counters.get(self.db.conn, check.pool, check.key_id, now)

    def _decide(self, checks: list[Check], estimate: int, now: datetime,
                reserved: dict[LeaseScope, int], work: dict[LeaseScope, Lease],
                created: float, others: dict[LeaseScope, int]) -> Decision:
        scope = lease_scope(checks)
        lease = work[scope]
        never = never_fits(checks, estimate)
        if never is not None:  # refused whatever is used: the lease stays as it is
            counter = self._counter(never, now)
            return Decision(False, None, never, counter.total, 0, estimate, None, counter.start, "never")
        if lease.spare and any(self._counter(c, now).total + reserved.get((c.pool.name, c.key_id), 0)
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
            counter = self._counter(check, now)
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

    def _shown(self, check: Check, rows: int, reserved: dict[LeaseScope, int],
               others: dict[LeaseScope, int]) -> tuple[int, int, int]:
        """(used, reserved by requests in flight, spare held by other proxies) of a check, as a person reads them.

        Used counts this process's finished requests whose rows are not
        written yet; this process's spare and leftover tokens are no request's.
        """
        scope = (check.pool.name, check.key_id)
        unlanded, spare = self.leases.held_here(check.pool.name, check.key_id)
        elsewhere = others.get(scope, 0)
        in_flight = reserved.get(scope, 0) - unlanded - spare - elsewhere
        return rows + unlanded, max(in_flight, 0), elsewhere

    def _grow(self, lease: Lease, delta: int, scope: LeaseScope, reserved: dict[LeaseScope, int],
              created: float) -> None:
        """Add `delta` tokens (may be negative) to the lease's row, creating it if needed."""
        pool, key = scope
        conn = self.db.conn
        if lease.id is None:
            self._lease_seq += 1
            lease.owner = f"{self.owner}#{self._lease_seq}"
            lease.id = reservations.insert(conn, scope, delta, created, lease.owner)
        elif delta:
            reservations.grow(conn, lease, delta, created)
        # Later requests of the same batch see this (as reservations.live would).
        reserved[(pool, None)] = reserved.get((pool, None), 0) + delta
        if key is not None:
            reserved[(pool, key)] = reserved.get((pool, key), 0) + delta

    # -- periodic (ledger thread) ----------------------------------------
    def give_up_crossed(self) -> None:
        """Spare tokens of scopes whose used + reserved crossed a limit (another
        process's usage beyond its estimates, say) are given up, so that nothing
        more is admitted from memory; `release_idle` hands them back."""
        candidates = self.leases.with_spare()
        if not candidates:
            return
        now = self.clock()
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            self.counters.refresh(conn)
            reserved, _, _ = reservations.live(conn, self._own_prefix())
            crossed = []
            for pool_name, key_id in candidates:
                pool = self.config.pools.get(pool_name)
                if pool is None:
                    continue
                limits: list[tuple[str | None, int | None]] = [(None, pool.limit)]
                rule = self.config.keys.get(key_id or "")
                if key_id is not None and rule is not None and pool_name in rule.limits:
                    limits.append((key_id, rule.limits[pool_name]))
                if any(limit is not None and self.counters.get(conn, pool, key, now).total
                       + reserved.get((pool_name, key), 0) > limit for key, limit in limits):
                    crossed.append((pool_name, key_id))
        finally:
            conn.execute("COMMIT")
        self.leases.give_up_spare(crossed)

    def release_idle(self, idle: float = LEASE_IDLE) -> None:
        """Spare tokens of leases no request used lately go back to the pool,
        and what finished requests left over (`excess`) in every lease."""
        freed = self.leases.take_idle(idle)
        if not freed:
            return
        try:
            with self._immediate() as conn:
                reservations.release(conn, freed)
        except BaseException:
            self.leases.untake_idle(freed)
            raise

    def release_all(self) -> None:
        """Graceful stop, every row written: this process's reservations go."""
        self.leases.clear()
        with self._immediate() as conn:
            reservations.delete_own(conn, self._own_prefix(whole_process=True))

    def heartbeat(self) -> None:
        """Keep this process's live reservations; expire abandoned ones."""
        now = time.time()
        with self._immediate() as conn:
            alive = reservations.keep_alive(conn, self._own_prefix(whole_process=True), self._own_prefix(), now)
        self.leases.forget_gone(alive)  # expired while this process was suspended
        self.leases.confirmed = now

    # -- reading ---------------------------------------------------------
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

    def add_reset(self, pool: str, key_id: str | None = None, note: str | None = None) -> str:
        return record_reset(self.db.conn, pool, key_id, note, self.clock())

    def status(self, forecast: bool = True) -> list[PoolStatus]:
        """Every pool (and every key with its own limit) as of now, as pool_status computes it for everyone,
        with this ledger's counters for `used` (no recount); `forecast=False` skips exhausted_at."""
        now = self.clock()
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            self.counters.refresh(conn)
            reserved, _, others = reservations.live(conn, self._own_prefix())

            def counted(scope: pool_status.Scope, start: datetime, end: datetime | None) -> int:
                return self.counters.get(conn, self.config.pools[scope.pool], scope.key_id, now).total

            result = pool_status.statuses(conn, pool_status.config_scopes(self.config), now,
                                          resets=self.counters.resets, counted=counted, forecast=forecast)
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
