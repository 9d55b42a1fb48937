"""`python -m addon top`: a live view of usage in the terminal.

Totals (today, this week, this month, trailing 12 months), each pool's gauge
against its limit, and the latest requests, refreshed as rows arrive. Made
for an 80x24 terminal over SSH: `q` quits, arrows / `j` `k` / PgUp PgDn
scroll the request list, `g` goes back to the newest.

The database is opened read-only and every refresh is one short read
transaction: in WAL mode readers never block the proxy's writer.
"""

from __future__ import annotations

import os
import select
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from addon import config as config_mod
from addon.ledger import pool_status
from addon.ledger.pool_status import PoolStatus
from addon.store import schema
from addon.windows import Window, iso_utc

FULL_REFRESH = 60.0  # seconds between full recounts of the totals
POLL = 0.25  # seconds between checks for new rows


@dataclass
class Totals:
    """Requests, tokens and cost per period, kept up to date incrementally."""

    bounds: dict[str, str] = field(default_factory=dict)  # period -> ISO start
    values: dict[str, list[float]] = field(default_factory=dict)  # period -> [requests, tokens, cost]
    last_id: int = 0
    computed_at: float = 0.0
    day: str = ""


PERIODS = ("today", "this week", "this month", "12 months")


def period_bounds(now: datetime, tz: ZoneInfo) -> dict[str, str]:
    return {
        "today": iso_utc(Window("day").bounds(now, tz)[0]),
        "this week": iso_utc(Window("week").bounds(now, tz)[0]),
        "this month": iso_utc(Window("month").bounds(now, tz)[0]),
        "12 months": iso_utc(now - timedelta(days=365)),
    }


def _totals_sql(since_id: bool) -> str:
    parts = []
    for i, _ in enumerate(PERIODS):
        parts += [f"COALESCE(SUM(ts >= :p{i}), 0)", f"COALESCE(SUM(CASE WHEN ts >= :p{i} THEN total_tokens END), 0)",
                  f"COALESCE(SUM(CASE WHEN ts >= :p{i} THEN cost_usd END), 0)"]
    where = "ts >= :p3" + (" AND id > :last" if since_id else "")
    return f"SELECT MAX(id), {', '.join(parts)} FROM requests WHERE {where}"


def update_totals(conn: sqlite3.Connection, totals: Totals, now: datetime, tz: ZoneInfo) -> None:
    day = now.astimezone(tz).date().isoformat()
    full = day != totals.day or time.monotonic() - totals.computed_at > FULL_REFRESH
    if full:
        totals.bounds = period_bounds(now, tz)
        totals.values = {p: [0, 0, 0.0] for p in PERIODS}
        totals.last_id = 0
        totals.day = day
        totals.computed_at = time.monotonic()
    params: dict[str, str | int] = {f"p{i}": totals.bounds[p] for i, p in enumerate(PERIODS)}
    params["last"] = totals.last_id
    row = conn.execute(_totals_sql(not full), params).fetchone()
    if row[0] is None:
        return
    for i, period in enumerate(PERIODS):
        values = totals.values[period]
        for j in range(3):
            values[j] += row[1 + 3 * i + j]
    # Rows older than 12 months with a newer id would be counted again: never,
    # the id only grows, so max(id) of the counted rows is where to go on.
    totals.last_id = max(totals.last_id, row[0])
    (latest,) = conn.execute("SELECT MAX(id) FROM requests").fetchone()
    totals.last_id = max(totals.last_id, latest or 0)


RECENT_SQL = """SELECT id, ts, model, endpoint, status, outcome, streamed, total_tokens, cost_usd, latency_ms,
  COALESCE(label, key_hint) AS who FROM requests ORDER BY id DESC LIMIT ? OFFSET ?"""


@dataclass
class Snapshot:
    now: datetime
    totals: dict[str, list[float]]
    pools: list[PoolStatus]
    recent: list[dict[str, Any]]
    count: int
    offset: int
    error: str | None = None


class Reader:
    """Everything `top` shows, read in one short read-only transaction."""

    def __init__(self, path: str | Path, config: config_mod.Config | None) -> None:
        self.path = Path(path)
        self.config = config
        self.conn: sqlite3.Connection | None = None
        self.totals = Totals()
        self.tz = config.timezone if config else None
        self.pool_count = len(config.pools) if config else 3

    def _connect(self) -> sqlite3.Connection:
        if self.conn is None:
            self.conn = schema.connect(self.path, readonly=True).conn
            self.conn.isolation_level = None  # we say BEGIN and COMMIT ourselves
        return self.conn

    def snapshot(self, rows: int, offset: int) -> Snapshot:
        now = datetime.now(timezone.utc)
        try:
            conn = self._connect()
            conn.execute("BEGIN")  # a consistent view; a WAL read lock never blocks the writer
            try:
                scopes = pool_status.scopes_for(conn, self.config)
                tz = self.tz or (scopes[0].tz if scopes else ZoneInfo("UTC"))
                try:
                    update_totals(conn, self.totals, now, tz)
                    (count,) = conn.execute("SELECT COUNT(*) FROM requests").fetchone()
                    offset = max(0, min(offset, count - 1))
                    cursor = conn.execute(RECENT_SQL, (rows, offset))
                    names = [d[0] for d in cursor.description]
                    recent = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
                    views = pool_status.statuses(conn, scopes, now)
                except sqlite3.OperationalError as exc:
                    if "no such table" not in str(exc):
                        raise
                    count, recent, views = 0, [], []
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            return Snapshot(now, {}, [], [], 0, offset, error=f"{self.path}: {exc}")
        totals = {p: list(v) for p, v in self.totals.values.items()}
        self.pool_count = len(views)
        return Snapshot(now, totals, views, recent, count, offset)

    @property
    def last_id(self) -> int:
        return self.totals.last_id

    def new_rows_since(self, last_id: int) -> int:
        try:
            (n,) = self._connect().execute("SELECT COUNT(*) FROM requests WHERE id > ?", (last_id,)).fetchone()
            return n
        except sqlite3.Error:
            return 0


# -- rendering ---------------------------------------------------------------------
def _tokens(n: float) -> str:
    n = int(n)
    if n >= 10_000_000:
        return f"{n / 1_000_000:,.1f}M"
    return f"{n:,}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m"


def gauge(fraction: float, width: int, style: str):
    """A bar that reads the same with and without colours (SSH, captures)."""
    from rich.text import Text

    filled = min(width, round(max(fraction, 0.0) * width))
    if fraction > 0 and filled == 0:
        filled = 1  # something was used: show it
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def render(snap: Snapshot, db_name: str, height: int):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = Table.grid(expand=True)
    title.add_column(ratio=1)
    title.add_column(justify="right")
    title.add_row(Text(f"usage top · {db_name} · {snap.now.strftime('%Y-%m-%d %H:%M:%S')} UTC", style="bold"),
                  Text("q quit  ↑↓/jk scroll", style="dim"))
    parts: list[Any] = [title]
    if snap.error:
        parts.append(Text(f"cannot read the database: {snap.error}", style="bold red"))
        return Group(*parts)

    totals = Table(box=None, padding=(0, 1), pad_edge=False, expand=False, header_style="bold cyan")
    totals.add_column("period", width=10)
    totals.add_column("requests", justify="right", width=10)
    totals.add_column("tokens", justify="right", width=14)
    totals.add_column("cost", justify="right", width=12)
    for period in PERIODS:
        requests, tokens, cost = snap.totals.get(period, (0, 0, 0.0))
        totals.add_row(period, f"{int(requests):,}", _tokens(tokens), f"${cost:,.2f}")
    parts.append(totals)

    gauges = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold cyan")
    gauges.add_column("pool", width=13, no_wrap=True, overflow="ellipsis")  # pool/label for key limits
    gauges.add_column("", width=20)
    gauges.add_column("used", justify="right", width=6)
    gauges.add_column("tokens / limit", justify="right", width=20, no_wrap=True)
    gauges.add_column("resets", justify="right", width=12, no_wrap=True)
    for pool in snap.pools:
        name = pool.pool + (f"/{pool.label or pool.key_id}" if pool.key_id else "")
        if pool.limit:
            fraction = pool.used / pool.limit
            style = "red" if fraction >= 1 else ("yellow" if fraction >= 0.8 else "green")
            bar: Any = gauge(fraction, 20, style)
            percent = f"{100 * fraction:.0f}%"
            amount = f"{_tokens(pool.used)} / {_tokens(pool.limit)}"
        else:
            bar, percent, amount = Text("track only", style="dim"), "", _tokens(pool.used)
        resets: str | Text = pool.window
        if pool.resets_at:
            resets = f"in {_duration((pool.resets_at - snap.now).total_seconds())}"
        if pool.exhausted_at is not None:  # the forecast: out before the reset at the last hour's pace
            resets = Text(f"out {_duration((pool.exhausted_at - snap.now).total_seconds())}", style="red")
        gauges.add_row(name, bar, percent, amount, resets)
    parts.append(gauges)

    recent = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold cyan", expand=True)
    recent.add_column("time", width=8, no_wrap=True)
    recent.add_column("model", ratio=4, no_wrap=True, overflow="ellipsis", min_width=8)
    recent.add_column("endpoint", ratio=3, no_wrap=True, overflow="ellipsis", min_width=6)
    recent.add_column("st", width=3, justify="right")
    recent.add_column("tokens", justify="right", width=7, no_wrap=True)
    recent.add_column("cost", justify="right", width=6, no_wrap=True)
    recent.add_column("ms", justify="right", width=5, no_wrap=True)
    recent.add_column("who", ratio=2, no_wrap=True, overflow="ellipsis", min_width=4)
    today = snap.now.strftime("%Y-%m-%d")
    for row in snap.recent:
        ts = row["ts"] or ""
        outcome = row["outcome"] or ""
        style = {"blocked": "red", "error": "yellow", "aborted": "magenta", "no_usage": "dim"}.get(outcome, "")
        status = str(row["status"] or "-")
        endpoint = (row["endpoint"] or "") + (" ~" if row["streamed"] else "")
        if outcome not in ("ok", ""):
            endpoint = f"{endpoint} {outcome}"
        when = ts[11:19] if ts[:10] == today else f"{ts[8:10]} {ts[11:16]}"
        recent.add_row(when, row["model"] or "-", endpoint, status,
                       _tokens(row["total_tokens"]) if row["total_tokens"] is not None else "-",
                       f"{row['cost_usd']:.4f}" if row["cost_usd"] is not None else "-",
                       f"{row['latency_ms']:.0f}" if row["latency_ms"] is not None else "-",
                       row["who"] or "-", style=style)
    first, last = snap.offset + 1, snap.offset + len(snap.recent)
    shown = f"{first}-{last} of {snap.count:,}" if snap.recent else "no requests yet"
    follow = "newest first" if snap.offset == 0 else "scrolled (g: newest)"
    caption = Text(f"latest requests · {shown} · {follow}", style="bold")
    parts += [caption, recent]
    return Group(*parts)


def fixed_lines(pool_count: int) -> int:
    """Lines used above the request rows: title, totals, gauges, caption, header."""
    return 1 + (1 + len(PERIODS)) + (1 + pool_count) + 1 + 1


# -- the terminal loop -------------------------------------------------------------------
KEYS = {
    "q": "quit", "Q": "quit", "\x03": "quit",
    "j": "down", "\x1b[B": "down", "\x1bOB": "down",
    "k": "up", "\x1b[A": "up", "\x1bOA": "up",
    "\x1b[6~": "pgdown", " ": "pgdown", "\x1b[5~": "pgup", "g": "home", "\x1b[H": "home", "G": "end",
}


def parse_keys(data: str) -> list[str]:
    actions = []
    i = 0
    while i < len(data):
        for length in (4, 3, 1):
            chunk = data[i:i + length]
            if chunk in KEYS:
                actions.append(KEYS[chunk])
                i += length
                break
        else:
            i += 1
    return actions


def run_live(reader: Reader, db_name: str, interval: float) -> int:
    import termios
    import tty

    from rich.console import Console
    from rich.live import Live

    console = Console()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    offset = 0
    last_id = -1
    redraw_at = 0.0
    tty.setcbreak(fd)
    try:
        with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
            while True:
                height = console.size.height
                rows = max(1, height - fixed_lines(reader.pool_count))
                new = reader.new_rows_since(last_id) if last_id >= 0 else 0
                if new or time.monotonic() >= redraw_at:
                    if offset:
                        offset += new  # a scrolled view stays on the same rows
                    snap = reader.snapshot(rows, offset)
                    offset, last_id = snap.offset, reader.last_id
                    live.update(render(snap, db_name, height), refresh=True)
                    redraw_at = time.monotonic() + interval
                ready, _, _ = select.select([fd], [], [], POLL)
                if not ready:
                    continue
                data = os.read(fd, 64).decode("utf-8", "replace")
                for action in parse_keys(data):
                    if action == "quit":
                        return 0
                    offset = {"down": offset + 1, "up": offset - 1, "pgdown": offset + rows - 1,
                              "pgup": offset - rows + 1, "home": 0, "end": 10**12}[action]
                    offset = max(0, offset)
                redraw_at = 0.0  # redraw now
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- the command ---------------------------------------------------------------------------
def run_top(db_path: str, config_path: str | None = None, *, interval: float = 1.0, once: bool = False) -> int:
    """`top`: the live view on a terminal, else (or with `once`) one screen; 1 without a database."""
    path = Path(db_path)
    if not path.exists():
        print(f"error: no database at {path} (start the proxy first, or pass --db)", file=sys.stderr)
        return 1
    config = config_mod.load(config_path) if config_path else None
    reader = Reader(path, config)
    if once or not (sys.stdin.isatty() and sys.stdout.isatty()):
        from rich.console import Console

        console = Console()
        height = console.size.height if console.is_terminal else 24
        try:
            reader.snapshot(1, 0)  # learn the number of pools
            snap = reader.snapshot(max(1, height - fixed_lines(reader.pool_count)), 0)
        finally:
            if reader.conn is not None:
                reader.conn.close()
        console.print(render(snap, path.name, height))
        return 0 if snap.error is None else 1
    return run_live(reader, path.name, max(0.2, interval))
