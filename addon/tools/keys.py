"""`python -m addon keys`: issue, list and revoke per-user keys."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from addon import config as config_mod
from addon.store import schema
from addon.store.issued_keys import create, load_all, revoke, row_dict


def _open(path: str):
    db = schema.connect(path)
    schema.migrate(db)
    return db


def create_key(db_path: str, config_path: str | None, label: str, *, prefix: str | None = None) -> int:
    """`keys create LABEL`: the new key on stdout (its only appearance), the note on stderr."""
    if prefix is None:
        prefix = config_mod.load(config_path).issued_keys.prefix
    label = label.strip()
    if not label:
        print("error: LABEL must not be empty", file=sys.stderr)
        return 2
    db = _open(db_path)
    try:
        key, row = create(db, label, prefix)
    finally:
        db.conn.close()
    print(key)
    print(f"issued key {row.key_id} for {label!r}; it is shown only this once.", file=sys.stderr)
    return 0


def list_keys(db_path: str, *, as_json: bool = False) -> int:
    """`keys list`: every issued key with today's (UTC) requests and tokens."""
    db = _open(db_path)
    try:
        keys = load_all(db.conn)
        today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        usage = {
            key_id: (n, tokens)
            for key_id, n, tokens in db.conn.execute(
                "select key_id, count(*), coalesce(sum(total_tokens), 0) from requests where ts >= ? group by key_id",
                (today,),
            )
        }
    finally:
        db.conn.close()
    if as_json:
        out = [{**row_dict(k), "requests_today": usage.get(k.key_id, (0, 0))[0],
                "tokens_today": usage.get(k.key_id, (0, 0))[1]} for k in keys]
        for item in out:
            item.pop("key_hash")
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("key_id", "label", "hint", "created (UTC)", "status", "req today", "tokens today"):
        table.add_column(column, justify="right" if "today" in column else "left", no_wrap=True)
    for k in keys:
        n, tokens = usage.get(k.key_id, (0, 0))
        status = f"revoked {k.revoked_at[:16].replace('T', ' ')}" if k.revoked_at else "active"
        created = k.created_at[:16].replace("T", " ")
        table.add_row(k.key_id, k.label, k.key_hint, created, status, f"{n:,}", f"{tokens:,}")
    console = Console()
    if not console.is_terminal:  # a pipe: never cut columns
        console = Console(width=200)
    console.print(table if keys else "no issued keys (python -m addon keys create LABEL)")
    return 0


def revoke_key(db_path: str, which: str) -> int:
    """`keys revoke WHICH`: revoke the active keys WHICH names; 1 when none does."""
    db = _open(db_path)
    try:
        revoked = revoke(db, which)
    finally:
        db.conn.close()
    if not revoked:
        print(f"error: no active issued key matches {which!r} (give a key id, a label or the key)", file=sys.stderr)
        return 1
    for k in revoked:
        print(f"revoked {k.key_id} ({k.label}, {k.key_hint})")
    return 0
