"""Build datasette-metadata.json: descriptions, canned queries (the JSON API), the dashboard.

The SQL lives here so that the status query and the dashboard's pool chart
share one text. Regenerate after editing:

    .venv/bin/python docs/build_metadata.py > datasette-metadata.json

(tests/test_datasette_metadata.py fails when the committed file is stale.)

Time in SQL: every timestamp is ISO 8601 UTC with milliseconds, so string
comparison orders them. Calendar windows (day/week/month) come precomputed in
the configured time zone from `pool_windows`; rolling windows are `now - N
hours`. "Today" is the local midnight of the configured time zone, taken from
the current calendar window (a rolling-only config falls back to UTC).
"""

from __future__ import annotations

import json
import sys
from typing import Any

DB = "usage"
ISO = "'%Y-%m-%dT%H:%M:%fZ'"

CLOCK = f"clock AS (SELECT strftime({ISO}, 'now') AS now)"

# Local midnight today: a current calendar window's start plus whole days
# (the shortest window first, so a day pool gives it exactly).
MIDNIGHT = f"""midnight AS (
  SELECT coalesce(
    (SELECT strftime({ISO}, w.start, '+' || CAST(julianday(clock.now) - julianday(w.start) AS INTEGER) || ' days')
       FROM pool_windows w, clock
      WHERE w.start <= clock.now AND clock.now < w."end"
      ORDER BY julianday(w."end") - julianday(w.start) LIMIT 1),
    strftime('%Y-%m-%dT00:00:00.000Z', 'now')) AS start
)"""

DAYS = "max(CAST(coalesce(nullif(:days, ''), 7) AS INTEGER), 1)"
# The first instant of the last :days local days (today included).
SINCE = f"since AS (SELECT strftime({ISO}, start, '-' || ({DAYS} - 1) || ' days') AS from_ts FROM midnight)"

STATUS = f"""WITH {CLOCK},
current AS (
  SELECT p.name AS pool, p."limit" AS lim, p."window" AS kind, p.timezone, p.rolling_hours,
         CASE WHEN p.rolling_hours IS NOT NULL
              THEN strftime({ISO}, clock.now, '-' || p.rolling_hours || ' hours')
              ELSE (SELECT w.start FROM pool_windows w
                     WHERE w.pool = p.name AND w.start <= clock.now AND clock.now < w."end") END AS period_start,
         CASE WHEN p.rolling_hours IS NULL
              THEN (SELECT w."end" FROM pool_windows w
                     WHERE w.pool = p.name AND w.start <= clock.now AND clock.now < w."end") END AS period_end,
         (SELECT max(r.ts) FROM resets r
           WHERE r.pool = p.name AND r.key_id IS NULL AND r.ts <= clock.now) AS last_reset,
         clock.now
    FROM pools p, clock
),
counting AS (
  -- A reset inside the current window moves its start: earlier usage no longer counts.
  SELECT *, CASE WHEN last_reset >= period_start THEN last_reset ELSE period_start END AS start FROM current
),
usage AS (
  SELECT c.*,
         (SELECT coalesce(sum(q.total_tokens), 0) FROM requests q
           WHERE q.pool = c.pool AND q.ts >= c.start AND q.ts < coalesce(c.period_end, '9999')) AS used,
         (SELECT min(q.ts) FROM requests q
           WHERE q.pool = c.pool AND q.ts >= c.start AND q.total_tokens > 0) AS oldest
    FROM counting c
)
SELECT pool,
       lim AS "limit",
       used,
       CASE WHEN lim IS NOT NULL THEN max(lim - used, 0) END AS remaining,
       CASE WHEN lim IS NULL THEN NULL WHEN lim = 0 THEN 100.0 ELSE round(100.0 * used / lim, 2) END AS percentage,
       start AS window_start,
       -- Rolling windows: when the oldest counted usage ages out (NULL: nothing to age out).
       CASE WHEN rolling_hours IS NULL THEN period_end
            ELSE strftime({ISO}, oldest, '+' || rolling_hours || ' hours') END AS resets_at,
       kind AS "window",
       timezone
  FROM usage
 ORDER BY pool"""

HISTORY = f"""WITH {CLOCK}, {MIDNIGHT}, {SINCE}
SELECT day, pool,
       count(*) AS requests,
       coalesce(sum(total_tokens), 0) AS tokens,
       round(sum(cost_usd), 9) AS cost_usd,
       coalesce(sum(input_tokens), 0) AS input_tokens,
       coalesce(sum(cached_tokens), 0) AS cached_tokens,
       coalesce(sum(output_tokens), 0) AS output_tokens,
       coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
       sum(outcome = 'blocked') AS blocked
  FROM requests, since
 WHERE requests.ts >= since.from_ts
 GROUP BY day, pool
 ORDER BY day DESC, pool"""

ALERTS = f"""WITH {CLOCK}, {MIDNIGHT}, {SINCE}
SELECT a.ts, a.pool, a.threshold, a.used, a."limit", a.message, a.delivered, a.key_id, a.window_start
  FROM alerts a, since
 WHERE a.ts >= since.from_ts
 ORDER BY a.ts DESC, a.id DESC"""

BY_MODEL = f"""WITH {CLOCK}, {MIDNIGHT}, {SINCE}
SELECT model, pool,
       count(*) AS requests,
       coalesce(sum(input_tokens), 0) AS input_tokens,
       coalesce(sum(cached_tokens), 0) AS cached_tokens,
       coalesce(sum(output_tokens), 0) AS output_tokens,
       coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
       coalesce(sum(total_tokens), 0) AS tokens,
       round(sum(cost_usd), 9) AS cost_usd,
       round(avg(latency_ms), 1) AS avg_latency_ms
  FROM requests, since
 WHERE requests.ts >= since.from_ts AND model IS NOT NULL
 GROUP BY model, pool
 ORDER BY tokens DESC, model"""

BY_KEY = f"""WITH {CLOCK}, {MIDNIGHT}, {SINCE},
keys AS (
  SELECT key_id,
         count(*) AS requests,
         coalesce(sum(total_tokens), 0) AS tokens,
         round(sum(cost_usd), 9) AS cost_usd,
         sum(outcome = 'blocked') AS blocked,
         max(ts) AS last_seen,
         max(id) AS last_id
    FROM requests, since
   WHERE requests.ts >= since.from_ts
   GROUP BY key_id
)
SELECT k.key_id, r.key_hint, r.label, k.requests, k.tokens, k.cost_usd, k.blocked, k.last_seen
  FROM keys k JOIN requests r ON r.id = k.last_id
 ORDER BY k.tokens DESC, k.key_id"""

# Per user: the label of an issued key or a [keys] entry, else the key hint.
BY_USER = f"""WITH {CLOCK}, {MIDNIGHT}, {SINCE}
SELECT coalesce(label, 'key ' || key_hint, '(no key)') AS user,
       count(DISTINCT key_id) AS keys,
       count(*) AS requests,
       coalesce(sum(total_tokens), 0) AS tokens,
       coalesce(sum(input_tokens), 0) AS input_tokens,
       coalesce(sum(output_tokens), 0) AS output_tokens,
       round(sum(cost_usd), 9) AS cost_usd,
       sum(outcome = 'blocked') AS blocked,
       sum(status = 401) AS refused_401,
       max(ts) AS last_seen
  FROM requests, since
 WHERE requests.ts >= since.from_ts
 GROUP BY 1
 ORDER BY tokens DESC, user"""

RECENT_COLUMNS = ("id, ts, model, pool, endpoint, outcome, status, streamed, input_tokens, cached_tokens, "
                  "output_tokens, reasoning_tokens, total_tokens, cost_usd, latency_ms, ttfb_ms, key_id, key_hint, "
                  "label, service_tier, error")
ROWS = "min(max(CAST(coalesce(nullif(:rows, ''), 50) AS INTEGER), 1), 1000)"

RECENT = f"""SELECT {RECENT_COLUMNS}
  FROM requests
 ORDER BY id DESC
 LIMIT {ROWS}"""

BLOCKED = f"""WITH {CLOCK}, {MIDNIGHT}, {SINCE}
SELECT id, ts, model, pool, key_id, key_hint, label, status, error
  FROM requests, since
 WHERE outcome = 'blocked' AND requests.ts >= since.from_ts
 ORDER BY id DESC
 LIMIT {ROWS}"""


# -- dashboard -------------------------------------------------------------

# Charts over a time range: the filters, else the last 14 local days.
RANGE = f"""WITH {CLOCK}, {MIDNIGHT},
range AS (SELECT strftime({ISO}, start, '-13 days') AS since FROM midnight)"""
RANGE_WHERE = """requests.ts >= CASE WHEN :date_from = '' THEN range.since ELSE '' END
   [[ AND day >= :date_from ]] [[ AND day <= :date_to ]] [[ AND pool = :pool ]]"""
TODAY = f"WITH {CLOCK}, {MIDNIGHT}"


def _metric(expression: str, title: str, prefix: str = "", suffix: str = "") -> dict[str, Any]:
    return {
        "title": title,
        "db": DB,
        "query": f"{TODAY} SELECT {expression} AS value FROM requests, midnight WHERE requests.ts >= midnight.start",
        "library": "metric",
        "display": {"field": "value", "prefix": prefix, "suffix": suffix},
    }


def _bars(field: str, title: str, category: str, label_sql: str, where_extra: str = "") -> dict[str, Any]:
    return {
        "title": title,
        "db": DB,
        "query": f"""{RANGE}
SELECT {label_sql} AS {category}, coalesce(sum(total_tokens), 0) AS tokens, round(sum(cost_usd), 4) AS cost_usd,
       count(*) AS requests
  FROM requests, range
 WHERE {RANGE_WHERE} {where_extra}
 GROUP BY 1 ORDER BY tokens DESC LIMIT 10""",
        "library": "vega-lite",
        "display": {
            "height": {"step": 22},
            "mark": {"type": "bar", "tooltip": True},
            "encoding": {
                "y": {"field": category, "type": "nominal", "sort": "-x", "title": None},
                "x": {"field": field, "type": "quantitative", "title": "tokens"},
                "tooltip": [
                    {"field": category, "type": "nominal"},
                    {"field": "tokens", "type": "quantitative", "format": ","},
                    {"field": "cost_usd", "type": "quantitative", "title": "cost (USD)"},
                    {"field": "requests", "type": "quantitative"},
                ],
            },
        },
    }


DASHBOARD: dict[str, Any] = {
    "title": "OpenAI usage",
    "description": "Tokens, pools, costs and blocked requests metered by the proxy. "
    "Refreshes every 10 s; pick a date range (local days) below, the default is the last 14 days.",
    "settings": {"allow_fullscreen": True, "autorefresh": 1 / 6},
    "layout": [
        ["tokens-today", "cost-today", "requests-today", "blocked-today"],
        ["pools-today", "pools-today", "tokens-per-day", "tokens-per-day"],
        ["cost-per-day", "cost-per-day", "top-models", "top-keys"],
        ["recent-blocked", "recent-blocked", "recent-blocked", "recent-blocked"],
    ],
    "filters": {
        "date_from": {"name": "From (day)", "type": "date"},
        "date_to": {"name": "To (day)", "type": "date"},
        "pool": {"name": "Pool", "type": "select", "db": DB, "query": "SELECT name FROM pools ORDER BY name"},
    },
    "charts": {
        "tokens-today": _metric("printf('%,d', coalesce(sum(total_tokens), 0))", "Tokens today"),
        "cost-today": _metric("printf('%.4f', coalesce(sum(cost_usd), 0))", "Cost today", prefix="$"),
        "requests-today": _metric("count(*)", "Requests today"),
        "blocked-today": _metric("coalesce(sum(outcome = 'blocked'), 0)", "Blocked today"),
        "pools-today": {
            "title": "Pools: share of the limit used in the current window",
            "db": DB,
            "query": f"""SELECT * FROM ({STATUS}) WHERE "limit" IS NOT NULL""",
            "library": "vega-lite",
            "display": {
                "height": {"step": 36},
                "transform": [{"calculate": "format(datum.percentage, '.1f') + '% of ' + format(datum.limit, ',')",
                               "as": "label"}],
                "encoding": {
                    "y": {"field": "pool", "type": "nominal", "title": None},
                    "x": {"field": "percentage", "type": "quantitative", "title": "% of limit",
                          "scale": {"domain": [0, 100], "clamp": True}},
                    "tooltip": [
                        {"field": "pool", "type": "nominal"},
                        {"field": "used", "type": "quantitative", "format": ","},
                        {"field": "limit", "type": "quantitative", "format": ","},
                        {"field": "percentage", "type": "quantitative"},
                        {"field": "resets_at", "type": "nominal"},
                    ],
                },
                "layer": [
                    {
                        "mark": {"type": "bar", "tooltip": True},
                        "encoding": {
                            "color": {
                                "condition": [
                                    {"test": "datum.percentage >= 100", "value": "#d62728"},
                                    {"test": "datum.percentage >= 80", "value": "#ff7f0e"},
                                ],
                                "value": "#4c78a8",
                            }
                        },
                    },
                    {
                        "mark": {"type": "text", "align": "left", "dx": 4},
                        "encoding": {"text": {"field": "label", "type": "nominal"}},
                    },
                ],
            },
        },
        "tokens-per-day": {
            "title": "Tokens per day, by pool",
            "db": DB,
            "query": f"""{RANGE}
SELECT day, coalesce(pool, '(none)') AS pool, coalesce(sum(total_tokens), 0) AS tokens
  FROM requests, range
 WHERE {RANGE_WHERE}
 GROUP BY day, pool ORDER BY day""",
            "library": "vega-lite",
            "display": {
                "height": 220,
                "mark": {"type": "bar", "tooltip": True},
                "encoding": {
                    "x": {"field": "day", "type": "ordinal", "title": None},
                    "y": {"field": "tokens", "type": "quantitative", "stack": "zero"},
                    "color": {"field": "pool", "type": "nominal"},
                },
            },
        },
        "cost-per-day": {
            "title": "Cost per day (USD)",
            "db": DB,
            "query": f"""{RANGE}
SELECT day, round(coalesce(sum(cost_usd), 0), 6) AS cost_usd,
       sum(cost_usd IS NULL AND total_tokens > 0) AS unpriced_requests
  FROM requests, range
 WHERE {RANGE_WHERE}
 GROUP BY day ORDER BY day""",
            "library": "vega-lite",
            "display": {
                "height": 220,
                "mark": {"type": "bar", "tooltip": True, "color": "#54a24b"},
                "encoding": {
                    "x": {"field": "day", "type": "ordinal", "title": None},
                    "y": {"field": "cost_usd", "type": "quantitative", "title": "USD"},
                    "tooltip": [
                        {"field": "day", "type": "ordinal"},
                        {"field": "cost_usd", "type": "quantitative", "title": "cost (USD)", "format": ".6f"},
                        {"field": "unpriced_requests", "type": "quantitative", "title": "requests without a price"},
                    ],
                },
            },
        },
        "top-models": _bars("tokens", "Top models (tokens)", "model", "model", "AND model IS NOT NULL"),
        "top-keys": _bars("tokens", "Top keys (tokens)", "key",
                          "coalesce(label, key_hint, key_id, '(no key)')"),
        "recent-blocked": {
            "title": "Recent blocked requests",
            "db": DB,
            "query": f"""{RANGE},
blocked AS (
  SELECT ts, model, pool, coalesce(label, key_hint) AS "key", status, error
    FROM requests, range
   WHERE outcome = 'blocked' AND {RANGE_WHERE}
   ORDER BY id DESC LIMIT 20
)
SELECT * FROM blocked
UNION ALL
SELECT 'none in this range', NULL, NULL, NULL, NULL, NULL WHERE NOT EXISTS (SELECT 1 FROM blocked)""",
            "library": "table",
            "display": {},
        },
    },
}


def _query(sql: str, title: str, description: str, params: list[str] | None = None) -> dict[str, Any]:
    query: dict[str, Any] = {"sql": sql, "title": title, "description": description}
    if params:
        query["params"] = params
    return query


def _columns(**described: str) -> dict[str, str]:
    return described


REQUEST_COLUMNS = _columns(
    id="Row id",
    ts="When the request arrived (ISO 8601 UTC, milliseconds)",
    day="Local date of ts in the configured time zone",
    host="Host the request went to",
    method="HTTP method",
    path="Request path without the query string",
    endpoint="chat.completions, responses, embeddings, ...",
    model="Model as answered (dated snapshot), else as requested",
    requested_model="Model as requested",
    pool="Token pool the model counts against",
    status="HTTP status the client got (NULL when none was sent)",
    outcome="ok, error, blocked (refused by a limit), aborted, no_usage",
    streamed="1 for SSE responses and WebSocket responses",
    transport="http (one body), sse (an event stream) or websocket (a response on a socket: Codex CLI, Realtime)",
    input_tokens="Input tokens (includes cached_tokens)",
    cached_tokens="Cached input tokens (part of input_tokens)",
    output_tokens="Output tokens (includes reasoning_tokens)",
    reasoning_tokens="Reasoning tokens (part of output_tokens)",
    total_tokens="input_tokens + output_tokens: what counts against a pool",
    audio_seconds="Audio duration billed (whisper-1), seconds",
    cost_usd="Cost in USD (genai-prices or the config's [prices]); NULL when the model's price is unknown",
    latency_ms="Request start to the last byte of the response, milliseconds",
    ttfb_ms="Request start to the response headers (streams: first body byte), milliseconds",
    key_id="First 12 hex digits of SHA-256 of the API key: stable, not reversible",
    key_hint="sk-... plus the key's last 4 characters",
    label="Who the key belongs to (config [keys] or issued keys)",
    project="OpenAI-Project of the request or response",
    request_id="OpenAI's x-request-id",
    response_id="chatcmpl-/resp_ id",
    service_tier="Service tier as answered: default, flex, priority",
    user_agent="The client's user agent (first 200 characters)",
    error="What went wrong, for any outcome but ok",
)


def build() -> dict[str, Any]:
    return {
        "title": "OpenAI usage meter",
        "description_html": (
            "Every OpenAI API call that went through the proxy: tokens, pools, limits, costs. "
            '<a href="/-/dashboards/usage">Dashboard</a> · JSON API: '
            '<a href="/usage/status.json?_shape=array">status</a>, '
            '<a href="/usage/history.json?_shape=array&days=7">history</a>, '
            '<a href="/usage/alerts.json?_shape=array&days=7">alerts</a>.'
        ),
        "source": "openai-usage-meter",
        "license": "Apache-2.0",
        # Arbitrary SQL is allowed (the dashboard runs its charts through it); Datasette listens on
        # 127.0.0.1 only. See README "Dashboard and JSON API" for locking it down.
        "databases": {
            DB: {
                "description": "Written by the mitmproxy addon (addon/usage.py); read-only here.",
                "tables": {
                    "requests": {
                        "description": "One row per metered HTTP exchange (over WebSocket: per response), "
                        "blocked ones too. Tokens follow "
                        "OpenAI's rule: cached is part of input, reasoning part of output, total = input + output.",
                        "sort_desc": "id",
                        "facets": ["model", "pool", "outcome", "transport", "key_hint"],
                        "units": {"latency_ms": "ms", "ttfb_ms": "ms", "audio_seconds": "s"},
                        "columns": REQUEST_COLUMNS,
                    },
                    "pools": {
                        "description": "The configured token pools, as the proxy last loaded them.",
                        "columns": {
                            "name": "Pool name",
                            "limit": "Tokens per window; NULL: track only",
                            "window": "day, week (from Monday), month or rolling:Nh",
                            "rolling_hours": "Length of a rolling window, hours",
                            "timezone": "Where day/week/month windows begin",
                            "models": "JSON list of model names and globs",
                            "thresholds": "JSON list of alert percentages",
                            "fail": "open or closed: what to do when usage cannot be known",
                            "updated_at": "When the proxy wrote this row",
                        },
                    },
                    "alerts": {
                        "description": "Alerts fired when a pool (or a key in it) crossed a threshold.",
                        "sort_desc": "ts",
                        "facets": ["pool", "delivered"],
                        "columns": {
                            "ts": "When the alert fired (UTC)",
                            "threshold": "Percentage of the limit crossed",
                            "used": "Tokens used when it fired",
                            "limit": "The limit, tokens",
                            "delivered": "1 once the webhook accepted it",
                            "window_start": "Start of the window it belongs to (UTC)",
                        },
                    },
                    "resets": {
                        "description": "Manual resets (python -m addon reset POOL): usage before ts no longer "
                        "counts in its window.",
                        "sort_desc": "ts",
                    },
                    "pool_windows": {"hidden": True},
                    "reservations": {"hidden": True},
                    "issued_keys": {"hidden": True},
                },
                "queries": {
                    "status": _query(
                        STATUS,
                        "Pool status",
                        "Per pool, now: tokens used in the current window, the limit, what remains, the "
                        "percentage used, when the window started (or was last reset) and when it resets (UTC).",
                    ),
                    "history": _query(
                        HISTORY,
                        "History per day and pool",
                        "Requests, tokens and cost per local day and pool over the last ?days= days "
                        "(default 7, today included).",
                        ["days"],
                    ),
                    "alerts": _query(
                        ALERTS, "Alerts", "Alerts fired in the last ?days= days (default 7).", ["days"]
                    ),
                    "by_model": _query(
                        BY_MODEL, "Usage by model", "Tokens and cost per model over the last ?days= days (default 7).",
                        ["days"],
                    ),
                    "by_key": _query(
                        BY_KEY,
                        "Usage by key",
                        "Tokens and cost per API key (hint and label, never the key) over the last ?days= days "
                        "(default 7).",
                        ["days"],
                    ),
                    "by_user": _query(
                        BY_USER,
                        "Usage by user",
                        "Requests, tokens and cost per user over the last ?days= days (default 7): the label of an "
                        "issued key or of a [keys] entry, else the key hint.",
                        ["days"],
                    ),
                    "recent": _query(RECENT, "Recent requests", "The latest ?rows= requests (default 50).",
                                     ["rows"]),
                    "blocked": _query(
                        BLOCKED,
                        "Blocked requests",
                        "Requests refused by a limit in the last ?days= days (default 7), latest first, "
                        "at most ?rows= (default 50).",
                        ["days", "rows"],
                    ),
                },
            }
        },
        "plugins": {"datasette-dashboards": {DB: DASHBOARD}},
    }


if __name__ == "__main__":
    json.dump(build(), sys.stdout, indent=2)
    sys.stdout.write("\n")
