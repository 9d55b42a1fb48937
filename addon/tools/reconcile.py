"""`python -m addon reconcile`: what OpenAI counted against what the proxy saw.

Reads the organization Usage API (`/v1/organization/usage/completions`,
grouped by model) and Costs API (`/v1/organization/costs`, grouped by line
item) with an admin key, stores the buckets in `openai_usage` and
`openai_costs`, and prints per UTC day and model both sides and the
difference, in tokens (Usage API against the proxy's completions rows) and
in USD (Costs API line items, "<model>, <item>", against the `cost_usd` of
every proxy row of that model). Traffic that bypassed the proxy (or keys the
proxy never saw) shows up as a positive difference. With `--alerts`, the pools' alert
thresholds are evaluated on OpenAI's figures too; with `--every 5m` it keeps
polling.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any, Literal

from addon import config as config_mod
from addon.ledger.reconcile import (
    DEFAULT_BASE_URL,
    PAGE_LIMITS,
    Client,
    ReconcileError,
    compare,
    evaluate_alerts,
    fetch,
)
from addon.store import schema
from addon.windows import iso_utc


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


# -- output ----------------------------------------------------------------------------
def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _usd(value: Any) -> str:
    return "-" if value is None else f"${value:,.4f}"


def _usd_diff(value: float) -> str:
    if abs(value) < 0.0000005:
        return "0"
    style = "bold red" if value > 0 else "yellow"
    return f"[{style}]{value:+,.6f}[/]"


def print_table(rows: list[dict[str, Any]], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    justify: Literal["left", "right"]
    for name, justify in (("day", "left"), ("model", "left"), ("OpenAI req", "right"), ("proxy req", "right"),
                          ("OpenAI tokens", "right"), ("proxy tokens", "right"), ("not via proxy", "right"),
                          ("OpenAI $", "right"), ("proxy $", "right"), ("$ not via proxy", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for row in rows:
        diff = row["difference_tokens"]
        style = "bold red" if diff > 0 else ("yellow" if diff < 0 else "")
        table.add_row(row["day"], row["model"] or "(none)", _n(row["openai_requests"]), _n(row["proxy_requests"]),
                      _n(row["openai_tokens"]), _n(row["proxy_tokens"]), f"[{style}]{diff:+,}[/]" if style else "0",
                      _usd(row["openai_cost_usd"]), _usd(row["proxy_cost_usd"]) + (
                          f" ({row['proxy_unpriced_requests']} unpriced)" if row["proxy_unpriced_requests"] else ""),
                      _usd_diff(row["difference_usd"]))
    console = Console(file=file)
    if not console.is_terminal:  # a pipe or a file: never cut columns
        console = Console(file=file, width=200)
    if not rows:
        console.print("no usage on either side in this range")
        return
    console.print(table)
    missing = sum(max(r["difference_tokens"], 0) for r in rows)
    if missing:
        console.print(f"[bold red]{missing:,} tokens counted by OpenAI were not seen by the proxy[/] "
                      "(traffic that bypassed it, or rows still being written)")
    else:
        console.print("every token OpenAI counted went through the proxy")
    billed = sum(r["difference_usd"] for r in rows)
    if abs(billed) >= 0.0000005:
        console.print(f"OpenAI's costs differ from the proxy's by ${billed:+,.6f} in this range "
                      "(traffic that bypassed the proxy, rows without a known price, or prices to update)")
    else:
        console.print("OpenAI's costs agree with the proxy's")


# -- the command --------------------------------------------------------------------
def run_reconcile(db_path: str, config_path: str | None = None, *, admin_key: str | None = None,
                  base_url: str = DEFAULT_BASE_URL, days: int = 7, bucket: str = "1d", every: float | None = None,
                  alerts: bool = False, as_json: bool = False) -> int:
    """`reconcile`: fetch, store and compare once (or every `every` seconds); 2 without an admin key."""
    key = admin_key or os.environ.get("OPENAI_ADMIN_KEY", "")
    if not key:
        print("error: no admin key: set OPENAI_ADMIN_KEY or pass --admin-key "
              "(create one at https://platform.openai.com/settings/organization/admin-keys)", file=sys.stderr)
        return 2
    if not 1 <= days <= 366:
        print("error: --days must be between 1 and 366", file=sys.stderr)
        return 2
    if bucket not in PAGE_LIMITS:
        print(f"error: --bucket must be one of {', '.join(PAGE_LIMITS)}", file=sys.stderr)
        return 2
    config = config_mod.load(config_path)
    client = Client(key, base_url)
    db = schema.connect(db_path)
    schema.migrate(db)
    try:
        while True:
            try:
                usage, costs = fetch(db, client, days=days, width=bucket)
            except ReconcileError as exc:
                print(f"error: {exc}", file=sys.stderr)
                if every is None:
                    return 1
            else:
                rows = compare(db, days=days, width=bucket)
                fired = evaluate_alerts(db, config, bucket) if alerts else []
                if as_json:
                    print(json.dumps({"fetched": {"usage_rows": usage, "cost_rows": costs}, "rows": rows,
                                      "alerts": [a["message"] for a in fired]}, indent=2), flush=True)
                else:
                    print(f"{iso_utc(datetime.now(timezone.utc))}  OpenAI usage: {usage} model-buckets, "
                          f"costs: {costs} line items ({bucket} buckets, last {days} UTC days)")
                    print_table(rows)
                    for alert in fired:
                        print(f"alert: {alert['message']}")
                    sys.stdout.flush()
            if every is None:
                return 0
            time.sleep(every)
    finally:
        db.conn.close()
