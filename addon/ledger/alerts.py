"""Alerts: a pool crossing a threshold of its limit, once per window.

Evaluated on the ledger thread from the same counters that admission uses;
each alert is a row in `alerts` (a unique `dedupe` key, made by the
schema's migrations, makes it fire once across every proxy process) and, with a webhook configured, a JSON POST
carrying both `text` (Slack) and `content` (Discord). Delivery runs on its
own thread with retries and backoff and never delays traffic.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from addon.ledger.policy import window_phrase
from addon.store import schema
from addon.windows import iso_utc
from addon.worker import FailureLog, QueueWorker

log = logging.getLogger(__name__)

BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds before each retry
TIMEOUT = 5.0
RESEND_WITHIN = 24 * 3600.0  # seconds: undelivered alerts younger than this are sent again at start-up


def alert_message(pool: str, key_id: str | None, label: str | None, threshold: float, used: int, limit: int,
                  window: str, resets_at: datetime | None) -> str:
    who = f" for {label or 'key ' + str(key_id)}" if key_id else ""
    reset = f"; resets {iso_utc(resets_at).replace('.000Z', 'Z')}" if resets_at else ""
    return (f"Pool '{pool}'{who} reached {threshold:g}% of its {window_phrase(window)} limit: "
            f"{used:,} of {limit:,} tokens used{reset}.")


def forecast_message(status: Any, now: datetime) -> str:
    who = f" for {getattr(status, 'label', None) or 'key ' + str(status.key_id)}" if status.key_id else ""
    stamp = lambda moment: iso_utc(moment).replace(".000Z", "Z")  # noqa: E731
    return (f"Pool '{status.pool}'{who} is on pace to run out at {stamp(status.exhausted_at)}, before it resets at "
            f"{stamp(status.resets_at)}: {status.used:,} of {status.limit:,} tokens used, "
            f"{status.pace_per_hour:,} in the last hour.")


class AlertEvaluator:
    """Turns pool statuses into alert rows; lives on the ledger thread."""

    def __init__(self, sender: WebhookSender | None, claim: Callable[[str], bool] | None = None) -> None:
        self.sender = sender
        # Proxies sharing pools through Redis fire each alert once between them (RedisLedger.claim_alert).
        self.claim = claim
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
                 now: datetime, forecast: bool = False) -> list[dict[str, Any]]:
        fired = []
        for status in statuses:
            if not status.limit:
                continue
            window_start = iso_utc(status.window_start)
            if forecast and self._on_pace_to_run_out(status, now):
                # Once per window (a rolling window has none to key it by: no forecast alerts there).
                message = forecast_message(status, now)
                row = self._fire(db, status, window_start, None, f"{status.pool}|{status.key_id or ''}|"
                                 f"{window_start}|forecast", message, now)
                if row is not None:
                    fired.append(row)
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
                message = alert_message(status.pool, status.key_id, getattr(status, "label", None), threshold,
                                        used, status.limit, status.window, status.resets_at)
                row = self._fire(db, status, window_start, threshold, dedupe, message, now)
                if row is not None:
                    fired.append(row)
        return fired

    @staticmethod
    def _on_pace_to_run_out(status: Any, now: datetime) -> bool:
        exhausted_at = getattr(status, "exhausted_at", None)
        return (exhausted_at is not None and exhausted_at > now and status.used < status.limit
                and status.resets_at is not None and not status.window.startswith("rolling:"))

    def _fire(self, db: sqlite_utils.Database, status: Any, window_start: str, threshold: float | None, dedupe: str,
              message: str, now: datetime) -> dict[str, Any] | None:
        """Record the alert (once across processes) and hand it to the webhook; None when fired before."""
        if dedupe in self.fired:
            return None
        self.fired.add(dedupe)
        if self.claim is not None and not self.claim(dedupe):
            return None  # another host fired it first
        row = {
            "ts": iso_utc(now),
            "pool": status.pool,
            "key_id": status.key_id,
            "window_start": window_start,
            "threshold": threshold,  # None: a forecast
            "used": status.used,
            "limit": status.limit,
            "message": message,
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
            return None  # another proxy process fired it first
        row["id"] = cursor.lastrowid
        log.warning("usage alert: %s", row["message"])
        if self.sender is not None:
            self.sender.send(row)
        return row


class WebhookSender(QueueWorker[dict[str, Any]]):
    """POSTs alerts to a webhook from its own thread, with retries."""

    def __init__(self, url: str | None, db_path: str | Path, backoff: tuple[float, ...] = BACKOFF,
                 resend_undelivered: bool = False) -> None:
        super().__init__("usage-alerts", max_batch=1, failures=FailureLog("usage: alert delivery", logger=log))
        self.url = url
        self.db_path = Path(db_path)
        self.backoff = backoff
        self._db: sqlite_utils.Database | None = None
        if resend_undelivered and url:
            # Alerts a stopped process could not deliver: first in line (the thread reads the database).
            self.put({"_resend": True})
        self.start()

    def send(self, alert: dict[str, Any]) -> None:
        self.put(alert)

    def close(self, timeout: float = 5.0) -> None:
        self.stop(timeout)

    def handle(self, batch: list[dict[str, Any]]) -> None:
        for alert in batch:
            if self.url:
                self._handle_one(alert)

    def _handle_one(self, alert: dict[str, Any]) -> None:
        if alert.get("_resend"):
            try:
                self._db = self._db or schema.connect(self.db_path)
                for row in self._undelivered(self._db):
                    self.put(row)
            except sqlite3.Error as exc:
                log.warning("usage: could not read undelivered alerts: %s", exc)
                self.finish()
            return
        delivered, attempts, error = self._deliver(alert)
        try:
            self._db = self._db or schema.connect(self.db_path)
            with self._db.conn:
                self._db.conn.execute(
                    "UPDATE alerts SET delivered = ?, attempts = COALESCE(attempts, 0) + ?, last_error = ?"
                    " WHERE id = ?",
                    (int(delivered), attempts, error, alert["id"]),
                )
        except sqlite3.Error as exc:
            log.warning("usage: could not record delivery of alert %s: %s", alert.get("id"), exc)
            self.finish()

    def finish(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None

    @staticmethod
    def _undelivered(db: sqlite_utils.Database) -> list[dict[str, Any]]:
        """Recent alerts with delivered = 0, oldest first. Each is claimed (last_error marked, in one
        statement that checks it is unchanged), so that of several proxies starting together one sends it."""
        since = iso_utc(datetime.fromtimestamp(time.time() - RESEND_WITHIN, timezone.utc))
        try:
            rows = db.conn.execute(
                'SELECT id, ts, pool, key_id, window_start, threshold, used, "limit", message, attempts, last_error'
                " FROM alerts WHERE delivered = 0 AND ts >= ? ORDER BY id", (since,)).fetchall()
        except sqlite3.OperationalError:  # no alerts table yet
            return []
        claimed = []
        mark = f"sending again (process {os.getpid()}, {iso_utc(datetime.now(timezone.utc))})"
        for row_id, ts, pool, key_id, window_start, threshold, used, limit, message, attempts, error in rows:
            with db.conn:
                cursor = db.conn.execute(
                    "UPDATE alerts SET last_error = ? WHERE id = ? AND delivered = 0 AND attempts IS ?"
                    " AND last_error IS ?", (mark, row_id, attempts, error))
            if cursor.rowcount == 1:
                claimed.append({"id": row_id, "ts": ts, "pool": pool, "key_id": key_id, "window_start": window_start,
                                "threshold": threshold, "used": used, "limit": limit, "message": message})
        if claimed:
            log.warning("usage: sending %d alert(s) again that were not delivered before", len(claimed))
        return claimed

    def _deliver(self, alert: dict[str, Any]) -> tuple[bool, int, str | None]:
        assert self.url is not None  # only called with a webhook configured
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
