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

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any, Literal

from addon import config as config_mod
from addon.ledger.reconcile import DEFAULT_BASE_URL, Client, ReconcileError, compare, evaluate_alerts, fetch
from addon.store import schema
from addon.windows import iso_utc


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)")
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


# -- command line --------------------------------------------------------------------
def register(subparsers) -> None:
    from addon.tools import cli

    parser = subparsers.add_parser(
        "reconcile", help="compare OpenAI's Usage/Costs API with what the proxy recorded",
        description="Read the organization Usage and Costs APIs (admin key), store the buckets in openai_usage and "
                    "openai_costs, and show per UTC day and model what OpenAI counted against what the proxy saw.")
    cli.add_common(parser)
    parser.add_argument("--admin-key", default=None, help="OpenAI admin key (default: $OPENAI_ADMIN_KEY)")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_ADMIN_BASE_URL", DEFAULT_BASE_URL),
                        help=f"API base URL (default: {DEFAULT_BASE_URL})")
    parser.add_argument("--days", type=int, default=7, help="UTC days back from today (default: 7)")
    parser.add_argument("--bucket", choices=("1d", "1h"), default="1d", help="bucket width to fetch (default: 1d)")
    parser.add_argument("--every", type=parse_duration, default=None, metavar="DURATION",
                        help="keep polling, e.g. 5m (default: once)")
    parser.add_argument("--alerts", action="store_true",
                        help="fire the pools' alert thresholds on OpenAI's figures as well")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key = args.admin_key or os.environ.get("OPENAI_ADMIN_KEY", "")
    if not key:
        print("error: no admin key: set OPENAI_ADMIN_KEY or pass --admin-key "
              "(create one at https://platform.openai.com/settings/organization/admin-keys)", file=sys.stderr)
        return 2
    if not 1 <= args.days <= 366:
        print("error: --days must be between 1 and 366", file=sys.stderr)
        return 2
    config = config_mod.load(args.config)
    client = Client(key, args.base_url)
    db = schema.connect(args.db)
    schema.migrate(db)
    while True:
        try:
            usage, costs = fetch(db, client, days=args.days, width=args.bucket)
        except ReconcileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if args.every is None:
                return 1
        else:
            rows = compare(db, days=args.days, width=args.bucket)
            fired = evaluate_alerts(db, config, args.bucket) if args.alerts else []
            if args.json:
                print(json.dumps({"fetched": {"usage_rows": usage, "cost_rows": costs}, "rows": rows,
                                  "alerts": [a["message"] for a in fired]}, indent=2), flush=True)
            else:
                print(f"{iso_utc(datetime.now(timezone.utc))}  OpenAI usage: {usage} model-buckets, "
                      f"costs: {costs} line items ({args.bucket} buckets, last {args.days} UTC days)")
                print_table(rows)
                for alert in fired:
                    print(f"alert: {alert['message']}")
                sys.stdout.flush()
        if args.every is None:
            return 0
        time.sleep(args.every)
