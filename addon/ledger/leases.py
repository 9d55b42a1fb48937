"""This process's leases: its reservation rows as it sees them in memory.

A lease is one reservation row per scope (a pool, or a key with its own
limit in it). Its `spare` tokens are reserved in the database for no request
yet: `admit_local` admits from them without a transaction (on the event
loop). The ledger thread grows and shrinks the rows (sqlite_ledger.py); the
event loop and the writer thread take and give back in memory, under a lock
held for memory updates only. See sqlite_ledger.py for the whole story.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from addon.ledger.policy import Check, Decision

LEASE_SHARE = 16  # spare tokens of a lease: at most 1/16 of what is left ...
LEASE_LIMIT_SHARE = 64  # ... and 1/64 of the limit
LEASE_IDLE = 10.0  # seconds without an admission before spare tokens go back

LeaseScope = tuple[str, str | None]  # (pool, key_id): key_id is None for the pool's own lease


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

    def give_up_spare(self) -> None:
        """No more admissions from memory: the spare tokens go back in the next transaction."""
        if self.spare:
            self.excess += self.spare
            self.spare = self.cap = 0


def lease_scope(checks: list[Check]) -> LeaseScope:
    return checks[0].pool.name, next((c.key_id for c in checks if c.key_id), None)


class Leases:
    """The leases of one ledger by scope, and the usage of finished requests whose rows are not written yet."""

    def __init__(self, stale_after: float) -> None:
        self._lock = threading.Lock()
        self._by_scope: dict[LeaseScope, Lease] = {}
        # Usage of finished requests whose rows are not written yet, by the
        # (id, owner) of the lease row that holds it until they are.
        self._unlanded: dict[tuple[int, str], int] = {}
        self.confirmed = 0.0  # time.time() of the last transaction that saw the leases alive
        self.stale_after = stale_after  # seconds after `confirmed` when a lease row may have expired unseen

    def clear(self) -> None:
        """Their rows are gone or not this process's to count on any more (moved file, graceful stop)."""
        with self._lock:
            self._by_scope.clear()

    # -- event loop and writer thread: memory only -------------------------
    def admit_local(self, checks: list[Check], estimate: int) -> Decision | None:
        """Admit from the scope's spare tokens; None when they do not cover the estimate."""
        scope = lease_scope(checks)
        with self._lock:
            lease = self._by_scope.get(scope)
            if lease is None or lease.id is None or lease.spare < estimate:
                return None
            if time.time() - self.confirmed > self.stale_after:
                return None  # the row may have expired meanwhile (a suspended machine): a transaction checks
            lease.spare -= estimate
            lease.used_at = time.monotonic()
            return Decision(True, lease.id, estimate=estimate, owner=lease.owner)

    def _find(self, reservation: int | None, owner: str) -> Lease | None:
        for lease in self._by_scope.values():
            if lease.id == reservation and lease.owner == owner:
                return lease
        return None

    def give_back(self, reservation: int | None, estimate: int, owner: str) -> None:
        """An admitted request that will never be recorded: its tokens are spare again."""
        with self._lock:
            lease = self._find(reservation, owner)
            if lease is not None:
                lease.spare += estimate
            # Else a lease replaced since, or of an earlier configuration or
            # file: its row expires on its own.

    def settle(self, reservation: int | None, owner: str, estimate: int, used: int) -> int:
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
        with self._lock:
            lease = self._find(reservation, owner)
            if lease is None or reservation is None:
                return estimate  # a lease replaced since: its row expires on its own
            if used:
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
            if lease.room < 0:
                lease.give_up_spare()
            return used

    def unforeseen(self, pool: str, used: int) -> None:
        """Usage no admission reserved (a background response or a batch read back): it eats the
        room of this process's leases in the pool; a lease without room gives its spare up."""
        with self._lock:
            for (lease_pool, _), lease in self._by_scope.items():
                if lease_pool == pool and lease.id is not None:
                    lease.room -= used
                    if lease.room < 0:
                        lease.give_up_spare()

    def landed(self, reservation: int | None, owner: str, used: int) -> None:
        """The row of a settled request is written (writer thread): its usage is in the rows now."""
        if reservation is None:
            return
        scope = (reservation, owner)
        with self._lock:
            left = self._unlanded.get(scope, 0) - used
            if left > 0:
                self._unlanded[scope] = left
            else:
                self._unlanded.pop(scope, None)

    def has_debt(self) -> bool:
        with self._lock:
            return any(lease.excess < 0 for lease in self._by_scope.values())

    def held_here(self, pool: str, key_id: str | None) -> tuple[int, int]:
        """(usage of finished requests whose rows are on their way, spare and leftover tokens no request holds)
        of this process's leases in a pool (or in a key's scope of it)."""
        unlanded = spare = 0
        with self._lock:
            for (lease_pool, key), lease in self._by_scope.items():
                if lease_pool == pool and (key_id is None or key == key_id) and lease.owner:
                    unlanded += self._unlanded.get((lease.id or 0, lease.owner), 0)
                    spare += lease.spare + max(lease.excess, 0)
        return unlanded, spare

    # -- ledger thread: around its transactions ------------------------------
    def take(self, scopes: list[LeaseScope]) -> dict[LeaseScope, Lease]:
        """Copies of the leases of the pools of `scopes` (created if missing), whose spare and leftover
        tokens move into the caller's transaction: the event loop cannot promise them meanwhile."""
        pools = {pool for pool, _ in scopes}
        with self._lock:
            for scope in scopes:
                self._by_scope.setdefault(scope, Lease())
            taken = {scope: lease.copy() for scope, lease in self._by_scope.items() if scope[0] in pools}
            for scope in taken:
                self._by_scope[scope].spare = self._by_scope[scope].excess = 0
        return taken

    def put_back(self, taken: dict[LeaseScope, Lease]) -> None:
        """The transaction failed: what `take` moved out is the leases' again."""
        with self._lock:
            for scope, lease in taken.items():
                current = self._by_scope.get(scope)
                if current is not None and current.same_row(lease):  # else the database was moved
                    current.spare += lease.spare
                    current.excess += lease.excess

    def merge(self, work: dict[LeaseScope, Lease], taken: dict[LeaseScope, Lease],
              admitted: list[LeaseScope]) -> None:
        """The transaction committed: the leases as it left them (`work`, from `taken`), plus what was given
        back and settled in memory meanwhile; `admitted`: scopes that admitted a request."""
        moment = time.monotonic()
        with self._lock:
            for scope, lease in work.items():
                current = self._by_scope.setdefault(scope, Lease())
                if not current.same_row(lease):
                    # A new row: what was given back meanwhile belonged to the old one.
                    current.id, current.owner, current.spare, current.excess = lease.id, lease.owner, lease.spare, 0
                    current.room = lease.room
                else:
                    current.spare += lease.spare
                    # Usage beyond estimates settled meanwhile still eats the new room.
                    current.room = lease.room + current.room - taken[scope].room
                current.cap = lease.cap
            for scope in admitted:
                self._by_scope[scope].used_at = moment

    def forget_gone(self, alive: set[tuple[int, str]], skip: dict[LeaseScope, Lease] | None = None) -> None:
        """Leases whose rows are not among `alive` (id, owner) expired (a long suspension): forgotten.
        `skip`: scopes a transaction holds copies of."""
        with self._lock:
            for scope, lease in self._by_scope.items():
                if skip is not None and scope in skip:
                    continue
                if lease.id is not None and (lease.id, lease.owner) not in alive:
                    lease.forget()

    def take_idle(self, idle: float) -> list[tuple[Lease, Lease, int]]:
        """Spare tokens no request used for `idle` seconds, and every lease's leftover tokens, leave the
        leases: (lease, its copy before, spare taken) for the transaction that gives them back."""
        moment = time.monotonic()
        freed: list[tuple[Lease, Lease, int]] = []
        with self._lock:
            for lease in self._by_scope.values():
                if lease.id is None:
                    continue
                idle_spare = lease.spare if moment - lease.used_at >= idle else 0
                if idle_spare or lease.excess:
                    freed.append((lease, lease.copy(), idle_spare))
                    lease.spare -= idle_spare
                    lease.excess = 0
        return freed

    def untake_idle(self, freed: list[tuple[Lease, Lease, int]]) -> None:
        """The transaction of `take_idle` failed: the tokens are the leases' again."""
        with self._lock:
            for lease, row, spare in freed:
                if lease.same_row(row):
                    lease.spare += spare
                    lease.excess += row.excess

    def with_spare(self) -> list[LeaseScope]:
        with self._lock:
            return [scope for scope, lease in self._by_scope.items() if lease.spare and lease.id is not None]

    def give_up_spare(self, scopes: list[LeaseScope]) -> None:
        with self._lock:
            for scope in scopes:
                lease = self._by_scope.get(scope)
                if lease is not None:
                    lease.give_up_spare()
