"""What the Limits addon (proxy/limits.py) needs of a ledger: the interface both backends satisfy.

- sqlite_ledger.Ledger: pools shared by the processes on one database file;
- redis_ledger.RedisLedger: pools shared by proxies on several hosts.

A new backend implements this Protocol (mypy checks the two above in
`Limits.configure` assigns them) and gets a branch there, the one
place that chooses. Threads: the methods marked "event loop" never wait
(memory only); the others run on the ledger thread, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import sqlite_utils

from addon.config import Config
from addon.ledger.estimate import PreviousUsage
from addon.ledger.policy import Check, Decision
from addon.ledger.pool_status import PoolStatus
from addon.store.inserts import Reservation


class LedgerBackend(Protocol):
    config: Config
    clock: Callable[[], datetime]

    @property
    def db(self) -> sqlite_utils.Database:
        """The local database, where pools are published and alerts recorded."""
        ...

    def publish_pools(self) -> None:
        """Write the configured pools and windows for SQL readers."""
        ...

    def close(self) -> None: ...

    # -- event loop (and writer thread): never waits -------------------------
    def admit_local(self, checks: list[Check], estimate: int) -> Decision | None:
        """An admission decided in memory, or None: ask `admit_many` on the ledger thread."""
        ...

    def give_back(self, reservation: int | None, estimate: int, owner: str) -> None:
        """An admitted request (Decision.reservation, .estimate, .owner) that will never be recorded."""
        ...

    def record(self, row: dict[str, Any], reservation: Reservation | None) -> bool:
        """A finished call's row, before the writer has it: its usage counts now (the backend may add
        private `_` keys to the row for the writer). True: call `pay_debts` on the ledger thread."""
        ...

    def landed(self, reservation: int | None, owner: str, used: int) -> None:
        """The row of a settled request is written (writer thread)."""
        ...

    # -- ledger thread --------------------------------------------------------
    def admit_many(self, requests: list[tuple[list[Check], int]]) -> list[Decision]:
        """Decide admissions (checks, estimate), in order; raises when the shared state cannot answer."""
        ...

    def previous_usage(self, response_id: str | None, conversation: str | None) -> PreviousUsage | None: ...

    def pay_debts(self) -> None:
        """Write usage beyond estimates that `record` left in memory."""
        ...

    def heartbeat(self) -> None:
        """Keep this process's reservations alive (every HEARTBEAT_INTERVAL), expire abandoned ones."""
        ...

    def give_up_crossed(self) -> None:
        """Admit nothing more from memory in scopes whose limit was crossed meanwhile."""
        ...

    def release_idle(self, idle: float = ...) -> None:
        """Give back tokens reserved for no request (idle for `idle` seconds)."""
        ...

    def release_all(self) -> None:
        """Graceful stop, every row written: this process's reservations go."""
        ...

    def add_reset(self, pool: str, key_id: str | None = None, note: str | None = None) -> str:
        """Usage before now no longer counts in the pool's (or key's) window; the reset's timestamp."""
        ...

    def status(self, forecast: bool = True) -> list[PoolStatus]: ...
