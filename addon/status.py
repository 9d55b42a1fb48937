"""`python -m addon status` and `python -m addon reset POOL`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import config as config_mod
from .cli import add_common
from .limits import Ledger, PoolStatus
from .windows import iso_utc


def register(subparsers) -> None:
    status = subparsers.add_parser(
        "status", help="each pool's used / limit / remaining / reset time",
        description="Print each pool's usage in its current window, as the proxy counts it "
                    "(rows of the window; reserved: requests in flight and the proxies' spare lease tokens).",
    )
    add_common(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=run_status)

    reset = subparsers.add_parser(
        "reset", help="reset a pool: usage before now no longer counts in its window",
        description="Record a reset anchor: usage before it no longer counts in the pool's current window "
                    "(for one key with --key). Running proxies pick it up at their next request.",
    )
    add_common(reset)
    reset.add_argument("pool", help="pool name from the config")
    reset.add_argument("--key", dest="key_id", help="reset only this key_id's count in the pool")
    reset.add_argument("--note", help="why (kept in the resets table)")
    reset.set_defaults(func=run_reset)


def _ledger(args: argparse.Namespace) -> Ledger:
    config = config_mod.load(args.config)
    if not Path(args.db).exists():
        raise FileNotFoundError(f"{args.db}: no such database (start the proxy first, or pass --db)")
    return Ledger(args.db, config)


def status_rows(statuses: list[PoolStatus], tz) -> list[dict]:
    rows = []
    for status in statuses:
        rows.append(
            {
                "pool": status.pool,
                "key_id": status.key_id,
                "label": status.label,
                "window": status.window,
                "limit": status.limit,
                "used": status.used,
                "reserved": status.reserved,
                "remaining": status.remaining,
                "percentage": status.percentage,
                "window_start": iso_utc(status.window_start),
                "resets_at": iso_utc(status.resets_at) if status.resets_at else None,
                "resets_at_local": status.resets_at.astimezone(tz).isoformat() if status.resets_at else None,
            }
        )
    return rows


def run_status(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    try:
        rows = status_rows(ledger.status(), ledger.config.timezone)
    finally:
        ledger.close()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    table = Table(title=f"Pools ({ledger.config.timezone_name})", title_justify="left")
    for column, justify in (("pool", "left"), ("window", "left"), ("limit", "right"), ("used", "right"),
                            ("reserved", "right"), ("remaining", "right"), ("%", "right"), ("resets at", "left")):
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        name = row["pool"] + (f" / {row['label'] or row['key_id']}" if row["key_id"] else "")
        limit = f"{row['limit']:,}" if row["limit"] is not None else "track only"
        remaining = f"{row['remaining']:,}" if row["remaining"] is not None else "-"
        pct = f"{row['percentage']:.1f}" if row["percentage"] is not None else "-"
        resets = _local(row["resets_at_local"]) if row["resets_at_local"] else "rolling"
        table.add_row(name, row["window"], limit, f"{row['used']:,}", f"{row['reserved']:,}", remaining, pct, resets)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped: do not squeeze to 80 columns
    console.print(table)
    return 0


def _local(text: str) -> str:
    moment = datetime.fromisoformat(text)
    return moment.strftime("%Y-%m-%d %H:%M")


def run_reset(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    if args.pool not in ledger.config.pools:
        print(f"error: unknown pool {args.pool!r} (pools: {', '.join(ledger.config.pools)})", file=sys.stderr)
        return 1
    try:
        stamp = ledger.add_reset(args.pool, args.key_id, args.note)
    finally:
        ledger.close()
    who = f" for key {args.key_id}" if args.key_id else ""
    print(f"pool {args.pool}{who} reset at {stamp}: usage before it no longer counts in the current window")
    return 0
