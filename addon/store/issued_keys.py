"""Per-user keys: the `issued_keys` table, its settings and an in-memory copy for the proxy.

`python -m addon keys create LABEL` prints a new key once and stores only
its SHA-256. With `[issued_keys] enabled = true` in the config, the proxy
swaps an issued key for the upstream key from the environment, refuses
revoked or unknown issued keys with an OpenAI-shaped 401, and meters the
call under the key's label (via `flow.metadata["usage_identity"]`).

The addon is proxy/issued_keys.py, the `keys` command tools/keys.py.
The hook never touches SQLite: a thread keeps an in-memory copy of the
table, reloaded when the database changes (checked every 0.25 s).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from addon.metering import wire
from addon.store import schema
from addon.windows import iso_utc
from addon.worker import FailureLog, Worker

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 0.25


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(36).replace("-", "A").replace("_", "z")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_hash: str
    key_id: str
    key_hint: str
    label: str
    created_at: str
    revoked_at: str | None


# -- database side (CLI and the refresher thread) -------------------------------
def create(db, label: str, prefix: str) -> tuple[str, IssuedKey]:
    key = new_key(prefix)
    row = IssuedKey(key_hash(key), wire.key_id(key), wire.key_hint(key), label,
                    iso_utc(datetime.now(timezone.utc)), None)
    with db.conn:
        db.table("issued_keys").insert(row_dict(row))
    return key, row


def row_dict(row: IssuedKey) -> dict[str, Any]:
    return {name: getattr(row, name) for name in IssuedKey.__slots__}


def load_all(conn: sqlite3.Connection) -> list[IssuedKey]:
    try:
        cursor = conn.execute(
            "select key_hash, key_id, key_hint, label, created_at, revoked_at from issued_keys order by created_at"
        )
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    return [IssuedKey(*row) for row in cursor.fetchall()]


def revoke(db, which: str) -> list[IssuedKey]:
    """Revoke by key id, label or the key itself; returns the keys revoked."""
    ids = {which, wire.key_id(which)}
    now = iso_utc(datetime.now(timezone.utc))
    with db.conn:
        matched = [k for k in load_all(db.conn) if k.revoked_at is None and (k.key_id in ids or k.label == which)]
        for k in matched:
            db.conn.execute("update issued_keys set revoked_at = ? where key_hash = ?", (now, k.key_hash))
    return matched


class KeyCache(Worker):
    """In-memory copy of `issued_keys`, kept fresh by a daemon thread."""

    def __init__(self, path: str | Path, interval: float = REFRESH_INTERVAL) -> None:
        self.path = Path(path)
        super().__init__("issued-keys", interval=interval, immediately=True, failures=FailureLog(
            "issued keys", logger=log, failing=f"issued keys: cannot read {self.path} ({{error}}); "
            "keeping the keys known so far", working=f"issued keys: {self.path} readable again"))
        self.keys: dict[str, IssuedKey] = {}  # key_hash -> key; replaced whole, never mutated
        self.loaded = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self.start()

    def get(self, key: str) -> IssuedKey | None:
        return self.keys.get(key_hash(key))

    def close(self) -> None:
        self.stop(5)

    def step(self) -> None:
        try:
            if self._conn is None:
                self._conn = schema.connect(self.path).conn
                self._version = None
            # data_version changes whenever another connection commits.
            current = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if current != self._version:
                self.keys = {k.key_hash: k for k in load_all(self._conn)}
                self._version = current
        except sqlite3.Error:
            self.finish()  # a new connection next time
            raise
        self.loaded.set()

    def finish(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
