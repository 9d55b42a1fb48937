"""`python -m addon reprice`: recompute cost_usd and cost_status of every recorded call."""

from __future__ import annotations

import logging

from addon import config as config_mod
from addon.metering.pricing import Pricer
from addon.store import schema

PRICE_COLUMNS = ("id", "ts", "model", "outcome", "endpoint", "input_tokens", "cached_tokens", "output_tokens",
                 "reasoning_tokens", "audio_seconds", "service_tier", "processing", "audio_input_tokens",
                 "audio_output_tokens", "image_input_tokens", "image_output_tokens", "cache_write_tokens",
                 "cached_audio_tokens", "tool_calls", "characters", "images", "image_size", "image_quality",
                 "cost_usd", "cost_status")


def reprice(db, pricer: Pricer, *, batch: int = 2000) -> dict[str, int]:
    """Recompute cost_usd and cost_status of every row; returns counts per outcome."""
    counts = {"rows": 0, "changed": 0, "priced": 0, "unpriced": 0, "free": 0, "no_usage": 0}
    last_id = 0
    columns = ", ".join(f'"{c}"' for c in PRICE_COLUMNS)
    while True:
        rows = [dict(zip(PRICE_COLUMNS, r, strict=True)) for r in db.execute(
            f"select {columns} from requests where id > ? order by id limit ?", [last_id, batch]).fetchall()]
        if not rows:
            return counts
        last_id = rows[-1]["id"]
        updates = []
        for row in rows:
            counts["rows"] += 1
            cost, status = pricer.quote(row)
            counts["unpriced" if status == "unknown_price" else status] += 1
            if cost != row["cost_usd"] or status != row["cost_status"]:
                updates.append((cost, status, row["id"]))
        if updates:
            with db.conn:
                db.conn.executemany("update requests set cost_usd = ?, cost_status = ? where id = ?", updates)
            counts["changed"] += len(updates)


def run_reprice(db_path: str, config_path: str | None = None) -> int:
    """`reprice`: reprice every row of DB_PATH with the config's prices and print the counts."""
    config = config_mod.load(config_path)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    db = schema.connect(db_path)
    try:
        schema.migrate(db)
        counts = reprice(db, Pricer.from_config(config))
    finally:
        db.conn.close()
    print(
        f"repriced {counts['rows']} rows in {db_path}: {counts['changed']} changed, "
        f"{counts['priced']} priced, {counts['free']} free, {counts['no_usage']} without usage, "
        f"{counts['unpriced']} with usage but no known price (cost_usd NULL)"
    )
    return 0
