"""The Datasette plugin of the package: SQL functions and the HTTP API.

Registered as the entry point `openai_usage_meter` of group `datasette`
(pyproject.toml), so that any Datasette installed in the same environment
loads it, `python -m addon run` and a hand-started
`datasette serve usage.db -m datasette-metadata.json` alike
(`datasette plugins` lists it).

- SQL functions, on every connection Datasette opens:
  `usage_status_json([now])`: every pool and key scope as pool_status
  computes it for the proxy, `status` and `top`, as a JSON array (the `status`
  canned query and the dashboard select from it with `json_each`);
  `usage_local_time(ts, tz)`: an ISO UTC timestamp as local
  `YYYY-MM-DD HH:MM:SS` in an IANA time zone.
- Routes: the older tools' HTTP API and the admin routes (http_api.py).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import datetime, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from datasette import hookimpl

from addon.datasette import http_api
from addon.ledger import pool_status

ACCESS_LOG_ENV = "USAGE_ACCESS_LOG"  # "0": no line per request (python -m addon run sets it unless --verbose)


@lru_cache(maxsize=64)
def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_time(ts: str | None, tz: str | None) -> str | None:
    if not ts:
        return None
    try:
        moment = pool_status.parse_ts(ts)
    except ValueError:
        try:
            moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
        except ValueError:
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(_zone(tz)).strftime("%Y-%m-%d %H:%M:%S")


def register_functions(conn: sqlite3.Connection) -> None:
    """The SQL functions (also for tests and scripts that use plain sqlite3)."""
    conn.create_function("usage_status_json", 0, lambda: pool_status.status_json(conn))
    conn.create_function("usage_status_json", 1, lambda now: pool_status.status_json(conn, now))
    conn.create_function("usage_local_time", 2, local_time, deterministic=True)


@hookimpl
def prepare_connection(conn):
    register_functions(conn)


@hookimpl
def register_routes():
    return http_api.ROUTES


@hookimpl
def skip_csrf(scope):
    # Token-authenticated JSON endpoints for scripts: no cookies, no forms.
    return scope.get("path", "").startswith(http_api.PREFIXES)


def _no_record(record: logging.LogRecord) -> bool:
    return False


@hookimpl
def startup():
    if os.environ.get(ACCESS_LOG_ENV) == "0":
        # A filter: `datasette serve` runs this before uvicorn configures its loggers, which resets their
        # levels and handlers but keeps filters.
        access = logging.getLogger("uvicorn.access")
        if _no_record not in access.filters:
            access.addFilter(_no_record)
