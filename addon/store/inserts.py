"""What goes into `requests`: text bounds, sanitizing, the insert, each response's usage counted once.

The tables and their migrations are store/schema.py; the thread that calls
`insert_rows` is store/writer.py.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import weakref
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from addon.store.schema import REQUEST_COLUMNS

log = logging.getLogger(__name__)

# Longest text kept per column: every text a request or an answer can put in a
# row is cut here (store.bound_columns, applied to every row written), so a
# 2 MB `model` costs 200 bytes. A text column missing here gets TEXT_LIMIT.
COLUMN_LIMITS: dict[str, int] = {
    "ts": 32,
    "day": 10,
    "host": 255,
    "method": 16,
    "path": 500,
    "endpoint": 100,
    "model": 200,
    "requested_model": 200,
    "pool": 100,
    "outcome": 16,
    "key_id": 16,
    "key_hint": 16,
    "project": 200,
    "request_id": 200,
    "service_tier": 64,
    "user_agent": 200,
    "error": 500,
    "response_id": 200,
    "label": 200,
}
TEXT_LIMIT = 1000


def bound_columns(row: dict[str, Any]) -> None:
    """Cut every text value of a row to its column's limit, in place."""
    for key, value in row.items():
        if isinstance(value, str):
            limit = COLUMN_LIMITS.get(key, TEXT_LIMIT)
            if len(value) > limit:
                row[key] = value[: limit - 1] + "…"


def sanitize_row(row: dict[str, Any], warned: set[str]) -> dict[str, Any]:
    """A copy of a row SQLite refused, with what it can bind: known columns only
    (each unknown one warned once, through `warned`), ints beyond 64 bits and
    other objects as text, lone surrogates replaced. Private keys stay as they are."""
    clean: dict[str, Any] = {}
    for key, value in row.items():
        if key.startswith("_"):  # private (a reservation): not a column, kept as is
            clean[key] = value
            continue
        if key not in REQUEST_COLUMNS:
            if key not in warned:
                warned.add(key)
                log.warning("usage: rows carry a column %r that table requests does not have; ignored", key)
            continue
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, int):
            value = value if -(2**63) <= value < 2**63 else str(value)
        elif value is not None and not isinstance(value, (str, float, bytes)):
            value = str(value)
        if isinstance(value, str):
            value = value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be bound
        clean[key] = value
    return clean


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an admitted request holds in `reservations` until its row is written.

    It travels from the Limits addon (`Call.extra["reservation"]`) in the row
    (`row["_reservation"]`, never a column) to the writer, which takes the
    tokens off the reservation in the transaction that inserts the row.
    """

    id: int | None  # the reservation row (a ledger's lease)
    tokens: int  # what the row's request holds of it
    owner: str | None  # the ledger that owns the row: SQLite reuses the ids of expired rows


def give_uid(row: dict[str, Any]) -> None:
    """The row's unique id (column `uid`), once: it keeps it through the spool and retries, so it is inserted once."""
    if "uid" not in row:
        row["uid"] = os.urandom(12).hex()


def insert_rows(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """Insert rows in the caller's transaction.

    A row may carry `_reservation`: the Reservation of the
    admission it was counted under. Those tokens leave the reservation in the
    same transaction, so a request's tokens are always counted exactly once,
    as reserved or as used, by every proxy process. (The owner guards against
    a reservation that expired and whose id SQLite gave to another process.)
    """
    count_once(db, rows)
    released: dict[tuple[int | None, str | None], int] = {}
    private = False
    for row in rows:
        give_uid(row)
        bound_columns(row)
        if "_reservation" in row:
            private = True
            held: Reservation | None = row["_reservation"]
            if held:
                scope = (held.id, held.owner)
                released[scope] = released.get(scope, 0) + held.tokens
    clean = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows] if private else rows
    if not _insert_plain(db, clean):
        db.table("requests").insert_all(clean, batch_size=500, columns=REQUEST_COLUMNS, ignore=True)
    if released:
        db.conn.executemany("UPDATE reservations SET tokens = MAX(tokens - ?, 0) WHERE id = ? AND owner = ?",
                            [(tokens, *scope) for scope, tokens in released.items()])


_PLAIN_VALUES = (str, int, float, type(None))


def _insert_plain(db: sqlite_utils.Database, rows: list[dict[str, Any]], fresh: bool = False) -> bool:
    """The proxy's rows with one prepared INSERT (what insert_all does, without building
    a new multi-row statement per batch and JSON-checking every value): False, and
    nothing done, for rows only insert_all handles (a column the table lacks, a value
    to convert), so that its errors stay as they were."""
    try:
        columns = None if fresh else _COLUMNS.get(db)
        if columns is None:
            columns, fresh = _table_columns(db), True
    except sqlite3.Error:
        return False
    names: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in names:
                if key not in columns:  # (a column added since the last look: look again)
                    return False if fresh else _insert_plain(db, rows, fresh=True)
                names[key] = None
            if type(value) not in _PLAIN_VALUES:  # bool, dicts, dates: insert_all converts them
                return False
    if not names:
        return False
    order = tuple(names)
    sql = f"INSERT OR IGNORE INTO [requests] ({', '.join(f'[{n}]' for n in order)}) VALUES " \
          f"({', '.join('?' * len(order))})"
    db.conn.executemany(sql, [tuple(row.get(n) for n in order) for row in rows])
    return True


def _table_columns(db: sqlite_utils.Database) -> frozenset[str]:
    """The columns `requests` has now, kept for the connection (columns are only ever added)."""
    columns = frozenset(r[1] for r in db.conn.execute("PRAGMA table_info([requests])"))
    if columns:
        _COLUMNS[db] = columns
    return columns


_COLUMNS: weakref.WeakKeyDictionary[sqlite_utils.Database, frozenset[str]] = weakref.WeakKeyDictionary()


# Columns that carry usage or its price: emptied in a row whose response was counted already.
USAGE_COLUMNS = (
    "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "audio_seconds",
    "cost_usd", "audio_input_tokens", "audio_output_tokens", "image_input_tokens", "image_output_tokens",
    "cache_write_tokens", "reported_total_tokens", "tool_calls", "characters", "images",
)
COUNTED_BEFORE = "usage already counted for this response id"


def count_once(db: sqlite_utils.Database, rows: list[dict[str, Any]]) -> None:
    """A response's usage counts once, whichever proxy process recorded it
    first and whenever: later rows with its id (background polls, retrievals,
    a finished batch read again) keep no usage. In the caller's write
    transaction, so two processes cannot both count it."""
    ids = {row["response_id"] for row in rows if row.get("response_id") and row.get("total_tokens") is not None}
    if not ids:
        return
    seen: set[str] = set()
    listed = list(ids)
    for start in range(0, len(listed), 500):
        part = listed[start : start + 500]
        seen.update(r[0] for r in db.conn.execute(
            f"SELECT DISTINCT response_id FROM requests WHERE response_id IN ({','.join('?' * len(part))})"
            " AND total_tokens IS NOT NULL", part))
    for row in rows:
        rid = row.get("response_id")
        if not rid or row.get("total_tokens") is None:
            continue
        if rid in seen:
            for column in USAGE_COLUMNS:
                if column in row:
                    row[column] = None
            row["error"] = row.get("error") or COUNTED_BEFORE
            if "cost_status" in row:  # priced before the usage was taken away; reprice says the same
                row["cost_status"] = "no_usage"
        else:
            seen.add(rid)
