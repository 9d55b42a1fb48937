"""Alerts: a pool crossing a threshold of its limit, once per window.

Evaluated on the ledger thread from the same counters that admission uses;
each alert is a row in `alerts` (a unique `dedupe` key makes it fire once
across every proxy process) and, with a webhook configured, a JSON POST
carrying both `text` (Slack) and `content` (Discord). Delivery runs on its
own thread with retries and backoff and never delays traffic.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from . import store
from .limits import window_phrase
from .windows import iso_utc

log = logging.getLogger(__name__)

BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds before each retry
TIMEOUT = 5.0


def ensure_dedupe_index(db: sqlite_utils.Database) -> None:
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS alerts_dedupe ON alerts(dedupe)")


def alert_message(pool: str, key_id: str | None, label: str | None, threshold: float, used: int, limit: int,
                  window: str, resets_at: datetime | None) -> str:
    who = f" for {label or 'key ' + str(key_id)}" if key_id else ""
    reset = f"; resets {iso_utc(resets_at).replace('.000Z', 'Z')}" if resets_at else ""
    return (f"Pool '{pool}'{who} reached {threshold:g}% of its {window_phrase(window)} limit: "
            f"{used:,} of {limit:,} tokens used{reset}.")


class AlertEvaluator:
    """Turns pool statuses into alert rows; lives on the ledger thread."""

    def __init__(self, sender: WebhookSender | None) -> None:
        self.sender = sender
        self.fired: set[str] = set()
        self.exhausted: set[tuple[str, str | None, str]] = set()  # (pool, key, window_start)

    def note_exhausted(self, pool: str, key_id: str | None, window_start: datetime | None) -> bool:
        """Remember that a window refused a request; True the first time."""
        if window_start is None:
            return False
        scope = (pool, key_id, iso_utc(window_start))
        if scope in self.exhausted:
            return False
        self.exhausted.add(scope)
        return True

    def evaluate(self, db: sqlite_utils.Database, statuses: Iterable[Any], thresholds: dict[str, tuple[float, ...]],
                 now: datetime) -> list[dict[str, Any]]:
        fired = []
        for status in statuses:
            if not status.limit:
                continue
            window_start = iso_utc(status.window_start)
            # Usage only (rows, and finished requests whose rows are on
            # their way): reservations are estimates, not usage. A refusal
            # is no usage either: a threshold fires when usage crosses it,
            # and its message states that usage.
            used = status.used
            percentage = 100.0 * used / status.limit
            for threshold in thresholds.get(status.pool, ()):
                if percentage < threshold:
                    continue
                dedupe = f"{status.pool}|{status.key_id or ''}|{window_start}|{threshold:g}"
                if dedupe in self.fired:
                    continue
                self.fired.add(dedupe)
                row = {
                    "ts": iso_utc(now),
                    "pool": status.pool,
                    "key_id": status.key_id,
                    "window_start": window_start,
                    "threshold": threshold,
                    "used": used,
                    "limit": status.limit,
                    "message": alert_message(status.pool, status.key_id, getattr(status, "label", None), threshold,
                                             used, status.limit, status.window, status.resets_at),
                    "delivered": 0,
                    "attempts": 0,
                    "dedupe": dedupe,
                }
                cursor = db.conn.execute(
                    "INSERT OR IGNORE INTO alerts (ts, pool, key_id, window_start, threshold, used, \"limit\", message,"
                    " delivered, attempts, dedupe) VALUES (:ts, :pool, :key_id, :window_start, :threshold, :used,"
                    " :limit, :message, :delivered, :attempts, :dedupe)",
                    row,
                )
                if cursor.rowcount != 1:
                    continue  # another proxy process fired it first
                row["id"] = cursor.lastrowid
                log.warning("usage alert: %s", row["message"])
                fired.append(row)
                if self.sender is not None:
                    self.sender.send(row)
        return fired


class WebhookSender:
    """POSTs alerts to a webhook from its own thread, with retries."""

    def __init__(self, url: str | None, db_path: str | Path, backoff: tuple[float, ...] = BACKOFF) -> None:
        self.url = url
        self.db_path = Path(db_path)
        self.backoff = backoff
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="usage-alerts", daemon=True)
        self._thread.start()

    def send(self, alert: dict[str, Any]) -> None:
        self._queue.put(alert)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        db: sqlite_utils.Database | None = None
        while True:
            alert = self._queue.get()
            if alert is None:
                break
            if not self.url:
                continue
            delivered, attempts, error = self._deliver(alert)
            try:
                db = db or store.connect(self.db_path)
                with db.conn:
                    db.conn.execute(
                        "UPDATE alerts SET delivered = ?, attempts = ?, last_error = ? WHERE id = ?",
                        (int(delivered), attempts, error, alert["id"]),
                    )
            except sqlite3.Error as exc:
                log.warning("usage: could not record delivery of alert %s: %s", alert.get("id"), exc)
                db = None
        if db is not None:
            db.conn.close()

    def _deliver(self, alert: dict[str, Any]) -> tuple[bool, int, str | None]:
        payload = {
            "text": alert["message"],  # Slack
            "content": alert["message"],  # Discord
            "pool": alert["pool"],
            "key_id": alert["key_id"],
            "threshold": alert["threshold"],
            "used": alert["used"],
            "limit": alert["limit"],
            "window_start": alert["window_start"],
            "ts": alert["ts"],
        }
        body = json.dumps(payload).encode()
        error = None
        attempts = 0
        for delay in (0.0, *self.backoff):
            if delay:
                threading.Event().wait(delay)
            attempts += 1
            request = urllib.request.Request(
                self.url, data=body, method="POST",
                headers={"content-type": "application/json", "user-agent": "openai-usage-meter"},
            )
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    if 200 <= response.status < 300:
                        return True, attempts, None
                    error = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    break  # the receiver will not take it: do not insist
            except (OSError, ValueError) as exc:
                error = str(exc)[:200]
        log.warning("usage: alert webhook delivery failed after %d attempts: %s", attempts, error)
        return False, attempts, error
