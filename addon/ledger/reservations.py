"""The SQL of the `reservations` table, as the SQLite ledger uses it (sqlite_ledger.py).

Each row is one process's lease in a scope: `tokens` reserved against the
pool (and key) for requests in flight plus `spare` ones promised to none yet;
`expires` is pushed on by its owner's heartbeat. Rows are a ledger's when
their owner starts with its prefix (`own_rows`); they are matched by
(id, owner) because SQLite reuses the ids of deleted rows. Callers hold the
transaction.
"""

from __future__ import annotations

import sqlite3
import time

from addon.ledger.leases import Lease, LeaseScope

RESERVATION_TTL = 120.0  # seconds; live reservations are refreshed well before
HEARTBEAT_INTERVAL = 30.0
OWN_ROWS = "substr(owner, 1, ?) = ?"  # with own_rows(): a ledger's reservation rows


def own_rows(prefix: str) -> tuple[int, str]:
    """Parameters of OWN_ROWS: the rows whose owner starts with `prefix`."""
    return len(prefix), prefix


def live(conn: sqlite3.Connection, prefix: str) -> tuple[dict[LeaseScope, int], set[tuple[int, str]],
                                                          dict[LeaseScope, int]]:
    """Live reservations of every process by (pool, key), (id, owner) of the rows whose owner starts with
    `prefix`, and the spare tokens the other rows held at their owners' last transaction."""
    totals: dict[LeaseScope, int] = {}
    others: dict[LeaseScope, int] = {}
    ours: set[tuple[int, str]] = set()
    rows = conn.execute(
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


def insert(conn: sqlite3.Connection, scope: LeaseScope, tokens: int, created: float, owner: str) -> int:
    """A new lease row; its id."""
    pool, key = scope
    cursor = conn.execute(
        "INSERT INTO reservations (pool, key_id, tokens, created, expires, owner) VALUES (?, ?, ?, ?, ?, ?)",
        (pool, key, max(tokens, 0), created, created + RESERVATION_TTL, owner),
    )
    assert cursor.lastrowid is not None  # an INSERT's row
    return cursor.lastrowid


def grow(conn: sqlite3.Connection, lease: Lease, delta: int, now: float) -> None:
    """Add `delta` tokens (may be negative, never below zero) to a lease's row, which lives on."""
    conn.execute("UPDATE reservations SET tokens = MAX(tokens + ?, 0), expires = ? WHERE id = ? AND owner = ?",
                 (delta, now + RESERVATION_TTL, lease.id, lease.owner))


def publish_spare(conn: sqlite3.Connection, leases: list[Lease]) -> None:
    """Other processes see what of each lease is spare (status: in flight vs held)."""
    conn.executemany("UPDATE reservations SET spare = ? WHERE id = ? AND owner = ?",
                     [(lease.spare, lease.id, lease.owner) for lease in leases if lease.id is not None])


def release(conn: sqlite3.Connection, freed: list[tuple[Lease, Lease, int]]) -> None:
    """Give back the spare tokens and leftovers of leases (Leases.take_idle)."""
    conn.executemany(
        "UPDATE reservations SET tokens = MAX(tokens - ?, 0), spare = MAX(COALESCE(spare, 0) - ?, 0)"
        " WHERE id = ? AND owner = ?",
        [(spare + row.excess, spare, row.id, row.owner) for _, row, spare in freed])


def delete_own(conn: sqlite3.Connection, prefix: str) -> None:
    conn.execute(f"DELETE FROM reservations WHERE {OWN_ROWS}", own_rows(prefix))


def keep_alive(conn: sqlite3.Connection, process_prefix: str, ledger_prefix: str, now: float) -> set[tuple[int, str]]:
    """Push on the expiry of a process's live rows, delete expired rows of every process (`now`: time.time());
    (id, owner) of the ledger's rows still alive."""
    # Only rows still alive: one that expired may already be counted on by
    # others. Rows of this process's earlier configurations too: their
    # requests in flight still hold them.
    conn.execute(f"UPDATE reservations SET expires = ? WHERE {OWN_ROWS} AND expires > ?",
                 (now + RESERVATION_TTL, *own_rows(process_prefix), now))
    conn.execute("DELETE FROM reservations WHERE expires <= ?", (now,))
    return set(conn.execute(f"SELECT id, owner FROM reservations WHERE {OWN_ROWS}",
                            own_rows(ledger_prefix)).fetchall())
