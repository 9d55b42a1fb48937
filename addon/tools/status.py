"""`python -m addon status` and `python -m addon reset POOL`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

from addon import config as config_mod
from addon.ledger import pool_status
from addon.ledger.pool_status import PoolStatus
from addon.ledger.published import record_reset
from addon.store import schema
from addon.tools.cli import add_common
from addon.windows import utc_now


def register(subparsers) -> None:
    status = subparsers.add_parser(
        "status", help="each pool's used / limit / remaining / reset time",
        description="Print each pool's (and each limited key's) usage in its current window, as the proxy counts "
                    "it (rows of the window; reserved: requests in flight; held: the proxies' spare lease tokens), and "
                    "when it runs out at the pace of the last hour. Reads the pools the proxy published to the "
                    "database; --config overrides them.",
    )
    add_common(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--redis", metavar="URL", help="read used and reserved from the Redis the proxies share "
                        "(usage_redis) instead of this database's rows")
    status.set_defaults(func=run_status)

    reset = subparsers.add_parser(
        "reset", help="reset a pool: usage before now no longer counts in its window",
        description="Record a reset anchor: usage before it no longer counts in the pool's current window "
                    "(for one key with --key). Running proxies pick it up at their next request.",
    )
    add_common(reset)
    reset.add_argument("pool", help="pool name (as the proxy published it, or from --config)")
    reset.add_argument("--key", dest="key_id", help="reset only this key_id's count in the pool")
    reset.add_argument("--note", help="why (kept in the resets table)")
    reset.add_argument("--redis", metavar="URL", help="also reset the pool in the Redis the proxies share "
                       "(usage_redis): every proxy counts anew")
    reset.set_defaults(func=run_reset)


def _open(args: argparse.Namespace, *, readonly: bool):
    """The database and the config given with --config (None: what the proxy published)."""
    config = config_mod.load(args.config) if args.config else None
    if not Path(args.db).exists():
        raise FileNotFoundError(f"{args.db}: no such database (start the proxy first, or pass --db)")
    return schema.connect(args.db, readonly=readonly), config


def status_rows(statuses: list[PoolStatus]) -> list[dict]:
    rows = []
    for status in statuses:
        row = pool_status.as_row(status)
        tz = ZoneInfo(status.timezone or "UTC")
        for name in ("resets_at", "exhausted_at"):
            moment = getattr(status, name)
            row[f"{name}_local"] = moment.astimezone(tz).isoformat() if moment else None
        rows.append(row)
    return rows


def run_status(args: argparse.Namespace) -> int:
    db, config = _open(args, readonly=True)
    conn = db.conn
    try:
        conn.isolation_level = None
        conn.execute("BEGIN")  # one consistent picture
        try:
            scopes = pool_status.scopes_for(conn, config)
            if args.redis:
                statuses = _shared_statuses(args.redis, scopes)
            else:
                statuses = pool_status.statuses(conn, scopes, utc_now())
        finally:
            conn.execute("COMMIT")
    finally:
        conn.close()
    rows = status_rows(statuses)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    zones = sorted({s.timezone or "UTC" for s in statuses}) or ["UTC"]
    table = Table(title=f"Pools ({', '.join(zones)})", title_justify="left")
    for column, justify in (("pool", "left"), ("window", "left"), ("limit", "right"), ("used", "right"),
                            ("reserved", "right"), ("held", "right"), ("remaining", "right"), ("%", "right"),
                            ("resets at", "left"), ("runs out at", "left")):
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        name = row["pool"] + (f" / {row['label'] or row['key_id']}" if row["key_id"] else "")
        limit = f"{row['limit']:,}" if row["limit"] is not None else "track only"
        remaining = f"{row['remaining']:,}" if row["remaining"] is not None else "-"
        pct = f"{row['percentage']:.1f}" if row["percentage"] is not None else "-"
        resets = _local(row["resets_at_local"]) if row["resets_at_local"] else "-"
        runs_out = _local(row["exhausted_at_local"]) if row["exhausted_at_local"] else "-"
        table.add_row(name, row["window"], limit, f"{row['used']:,}", f"{row['reserved']:,}", f"{row['held']:,}",
                      remaining, pct, resets, runs_out)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # piped: do not squeeze to 80 columns
    console.print(table)
    return 0


def _local(text: str) -> str:
    moment = datetime.fromisoformat(text)
    return moment.strftime("%Y-%m-%d %H:%M")


def run_reset(args: argparse.Namespace) -> int:
    db, config = _open(args, readonly=False)
    try:
        pools = list(dict.fromkeys(scope.pool for scope in pool_status.scopes_for(db.conn, config)))
        if args.pool not in pools:
            print(f"error: unknown pool {args.pool!r} (pools: {', '.join(pools)})", file=sys.stderr)
            return 1
        if args.redis:
            from addon.ledger.redis_ledger import reset_shared
            from addon.store.redis_rows import ping

            with ping(args.redis) as client:
                reset_shared(client, args.pool, args.key_id)
        with db.conn:
            stamp = record_reset(db.conn, args.pool, args.key_id, args.note, utc_now())
    finally:
        db.conn.close()
    who = f" for key {args.key_id}" if args.key_id else ""
    print(f"pool {args.pool}{who} reset at {stamp}: usage before it no longer counts in the current window")
    return 0


def _shared_statuses(url: str, scopes: list[pool_status.Scope]) -> list[PoolStatus]:
    from addon.ledger.redis_ledger import shared_statuses
    from addon.store.redis_rows import ping

    with ping(url) as client:
        return shared_statuses(client, scopes, utc_now())
