"""`python -m addon status` and `python -m addon reset POOL`."""

from __future__ import annotations

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
from addon.windows import utc_now


def _open(db_path: str, config_path: str | None, *, readonly: bool):
    """The database and the config given with --config (None: what the proxy published)."""
    config = config_mod.load(config_path) if config_path else None
    if not Path(db_path).exists():
        raise FileNotFoundError(f"{db_path}: no such database (start the proxy first, or pass --db)")
    return schema.connect(db_path, readonly=readonly), config


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


def run_status(db_path: str, config_path: str | None = None, *, as_json: bool = False, redis: str | None = None) -> int:
    """`status`: print each pool's figures as a table (or JSON); raises FileNotFoundError without a database."""
    db, config = _open(db_path, config_path, readonly=True)
    conn = db.conn
    try:
        conn.isolation_level = None
        conn.execute("BEGIN")  # one consistent picture
        try:
            scopes = pool_status.scopes_for(conn, config)
            if redis:
                statuses = _shared_statuses(redis, scopes)
            else:
                statuses = pool_status.statuses(conn, scopes, utc_now())
        finally:
            conn.execute("COMMIT")
    finally:
        conn.close()
    rows = status_rows(statuses)
    if as_json:
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


def run_reset(db_path: str, config_path: str | None, pool: str, *, key_id: str | None = None,
              note: str | None = None, redis: str | None = None) -> int:
    """`reset POOL`: record a reset anchor (and reset the shared Redis pool with `redis`)."""
    db, config = _open(db_path, config_path, readonly=False)
    try:
        pools = list(dict.fromkeys(scope.pool for scope in pool_status.scopes_for(db.conn, config)))
        if pool not in pools:
            print(f"error: unknown pool {pool!r} (pools: {', '.join(pools)})", file=sys.stderr)
            return 1
        if redis:
            from addon.ledger.redis_ledger import reset_shared
            from addon.store.redis_rows import ping

            with ping(redis) as client:
                reset_shared(client, pool, key_id)
        with db.conn:
            stamp = record_reset(db.conn, pool, key_id, note, utc_now())
    finally:
        db.conn.close()
    who = f" for key {key_id}" if key_id else ""
    print(f"pool {pool}{who} reset at {stamp}: usage before it no longer counts in the current window")
    return 0


def _shared_statuses(url: str, scopes: list[pool_status.Scope]) -> list[PoolStatus]:
    from addon.ledger.redis_ledger import shared_statuses
    from addon.store.redis_rows import ping

    with ping(url) as client:
        return shared_statuses(client, scopes, utc_now())
