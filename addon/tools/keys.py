"""`python -m addon keys`: issue, list and revoke per-user keys."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

from addon import config as config_mod
from addon.store import schema
from addon.store.issued_keys import create, load_all, revoke, row_dict
from addon.tools.cli import add_common


def register(subparsers) -> None:
    parser = subparsers.add_parser("keys", help="issue, list and revoke per-user keys",
                                   description="Per-user keys: the proxy forwards them with the shared upstream key.")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    create_p = sub.add_parser("create", help="issue a new key for LABEL (shown once)")
    create_p.add_argument("label")
    create_p.add_argument("--prefix", default=None, help="key prefix (default: [issued_keys] prefix or sk-usr-)")
    add_common(create_p)
    create_p.set_defaults(func=_cmd_create)
    list_p = sub.add_parser("list", help="issued keys with today's usage")
    list_p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_common(list_p, config=False)
    list_p.set_defaults(func=_cmd_list)
    revoke_p = sub.add_parser("revoke", help="revoke by key id, label or the key itself (takes effect within ~1 s)")
    revoke_p.add_argument("which")
    add_common(revoke_p, config=False)
    revoke_p.set_defaults(func=_cmd_revoke)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _open(path: str):
    db = schema.connect(path)
    schema.migrate(db)
    return db


def _cmd_create(args: argparse.Namespace) -> int:
    prefix = args.prefix
    if prefix is None:
        prefix = config_mod.load(args.config).issued_keys.prefix
    label = args.label.strip()
    if not label:
        print("error: LABEL must not be empty")
        return 2
    db = _open(args.db)
    key, row = create(db, label, prefix)
    print(key)
    import sys

    print(f"issued key {row.key_id} for {label!r}; it is shown only this once.", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    db = _open(args.db)
    keys = load_all(db.conn)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    usage = {
        key_id: (n, tokens)
        for key_id, n, tokens in db.conn.execute(
            "select key_id, count(*), coalesce(sum(total_tokens), 0) from requests where ts >= ? group by key_id",
            (today,),
        )
    }
    if args.json:
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


def _cmd_revoke(args: argparse.Namespace) -> int:
    db = _open(args.db)
    revoked = revoke(db, args.which)
    if not revoked:
        print(f"error: no active issued key matches {args.which!r} (give a key id, a label or the key)")
        return 1
    for k in revoked:
        print(f"revoked {k.key_id} ({k.label}, {k.key_hint})")
    return 0
