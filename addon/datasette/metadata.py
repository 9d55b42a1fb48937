"""Datasette's metadata: descriptions, canned queries (the JSON API), the dashboard.

Built from code, so that an installed package serves the same dashboard as the
repository (`run` writes it next to Datasette at start), and so that the status
query and the dashboard's pool chart share one text. The repository's
`datasette-metadata.json` is this module's output, for `datasette serve usage.db
-m datasette-metadata.json`; regenerate it after editing:

    .venv/bin/python docs/build_metadata.py > datasette-metadata.json

(tests/test_datasette.py fails when the committed file is stale.)

Time in SQL: every timestamp is ISO 8601 UTC with milliseconds, so string
comparison orders them. Calendar windows (day/week/month) come precomputed in
the configured time zone from `pool_windows`; rolling windows are `now - N
hours`. "Today" is the local midnight of the configured time zone, taken from
the current calendar window (a rolling-only config falls back to UTC).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

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

# Status is computed in Python by addon/ledger/pool_status.py, the code the proxy's ledger, `status` and `top`
# run; the plugin (addon/datasette/plugin.py) gives it to SQL as usage_status_json(): one row per scope.
STATUS_COLUMNS = ("pool", "key_id", "label", "limit", "used", "remaining", "percentage", "window_start", "resets_at",
                  "exhausted_at", "reserved", "held", "pace_per_hour", "window", "timezone")


def _status_sql(where: str, columns: tuple[str, ...] = STATUS_COLUMNS) -> str:
    picked = ",\n       ".join(f"json_extract(s.value, '$.{c}') AS \"{c}\"" for c in columns)
    return f"""SELECT {picked}
  FROM json_each(usage_status_json()) s
 WHERE {where}
 ORDER BY 1, 2"""


# Per pool (the contract's columns first); the keys with their own limits in KEY_STATUS.
STATUS = _status_sql("json_extract(s.value, '$.key_id') IS NULL",
                     tuple(c for c in STATUS_COLUMNS if c not in ("key_id", "label")))
KEY_STATUS = _status_sql("json_extract(s.value, '$.key_id') IS NOT NULL")

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


# The configured time zone (pools are published with it), for times shown on the dashboard.
TZ = "(SELECT coalesce(max(timezone), 'UTC') FROM pools)"

# Today, per local hour, for each limited calendar-window pool: tokens used in the window so far (as % of the
# limit, so that pools of any size share the axis), and the projection at the last hour's pace to where it runs
# out (exhausted_at), else to the window's end or midnight, from the same status the proxy and the API compute.
TODAY_BY_HOUR = """WITH s AS (
  SELECT json_extract(value, '$.pool') AS pool, json_extract(value, '$.limit') AS lim,
         json_extract(value, '$.used') AS used, json_extract(value, '$.pace_per_hour') AS pace,
         json_extract(value, '$.window_start') AS counting_start, json_extract(value, '$.resets_at') AS resets_at,
         json_extract(value, '$.exhausted_at') AS exhausted_at, json_extract(value, '$.timezone') AS tz
    FROM json_each(usage_status_json())
   WHERE json_extract(value, '$.key_id') IS NULL AND json_extract(value, '$.limit') > 0
     AND json_extract(value, '$.window') NOT LIKE 'rolling:%'
),
d AS (
  SELECT *, usage_local_time(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), tz) AS now_local,
         substr(usage_local_time(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), tz), 1, 10) || ' 00:00:00' AS midnight,
         usage_local_time(counting_start, tz) AS start_local, usage_local_time(resets_at, tz) AS resets_local,
         usage_local_time(exhausted_at, tz) AS exhausted_local
    FROM s
),
h AS (
  SELECT d.pool, substr(usage_local_time(r.ts, d.tz), 1, 13) || ':00:00' AS hour, sum(r.total_tokens) AS tokens
    FROM d JOIN requests r ON r.pool = d.pool
   WHERE r.ts >= d.counting_start AND r.total_tokens IS NOT NULL AND usage_local_time(r.ts, d.tz) >= d.midnight
   GROUP BY 1, 2
),
b AS (
  SELECT d.*, d.used - coalesce((SELECT sum(tokens) FROM h WHERE h.pool = d.pool), 0) AS before_today,
         -- The projection ends where the pool runs out, else at the reset or midnight, whichever is first.
         min(coalesce(d.exhausted_local, d.resets_local), d.resets_local,
             strftime('%Y-%m-%d %H:%M:%S', d.midnight, '+1 day')) AS horizon
    FROM d
),
points AS (
  SELECT pool, 'used' AS series, max(midnight, start_local) AS time, before_today AS tokens, lim, exhausted_local
    FROM b
  UNION ALL
  SELECT h.pool, 'used', min(strftime('%Y-%m-%d %H:%M:%S', h.hour, '+1 hour'), b.now_local),
         b.before_today + sum(h.tokens) OVER (PARTITION BY h.pool ORDER BY h.hour), b.lim, b.exhausted_local
    FROM h JOIN b ON b.pool = h.pool
  UNION ALL
  SELECT pool, 'used', now_local, used, lim, exhausted_local FROM b
  UNION ALL
  SELECT pool, 'projection', now_local, used, lim, exhausted_local FROM b
  UNION ALL
  SELECT pool, 'projection', horizon,
         used + CAST(round(pace * (julianday(horizon) - julianday(now_local)) * 24) AS INTEGER), lim, exhausted_local
    FROM b
)
SELECT pool, series, replace(time, ' ', 'T') AS time, tokens, lim AS "limit",
       round(100.0 * tokens / lim, 2) AS percentage, coalesce(exhausted_local, 'not before the reset') AS runs_out
  FROM points
 ORDER BY pool, series, time"""

def _share_bars(title: str, query: str, *, category: str, step: int, x_title: str, label: str,
                tooltip: list[str | dict[str, str]], bar: dict[str, Any]) -> dict[str, Any]:
    """Horizontal bars of `percentage` (0-100) per `category`, each labelled at its end."""
    fields = {"used": "quantitative", "limit": "quantitative", "reserved": "quantitative",
              "percentage": "quantitative", "resets_at": "nominal"}
    tips: list[dict[str, str]] = [{"field": category, "type": "nominal"}]
    for tip in tooltip:
        if isinstance(tip, dict):
            tips.append(tip)
        else:
            tips.append({"field": tip, "type": fields[tip]} | ({"format": ","} if tip in ("used", "limit", "reserved")
                                                                else {}))
    return {
        "title": title,
        "db": DB,
        "query": query,
        "library": "vega-lite",
        "display": {
            "height": {"step": step},
            "transform": [{"calculate": label, "as": "label"}],
            "encoding": {
                "y": {"field": category, "type": "nominal", "title": None},
                "x": {"field": "percentage", "type": "quantitative", "title": x_title,
                      "scale": {"domain": [0, 100], "clamp": True}},
                "tooltip": tips,
            },
            "layer": [bar, {"mark": {"type": "text", "align": "left", "dx": 4},
                            "encoding": {"text": {"field": "label", "type": "nominal"}}}],
        },
    }


_TODAY_TOOLTIP = [
    {"field": "pool", "type": "nominal"},
    {"field": "series", "type": "nominal"},
    {"field": "time", "type": "temporal", "format": "%H:%M"},
    {"field": "tokens", "type": "quantitative", "format": ","},
    {"field": "limit", "type": "quantitative", "format": ","},
    {"field": "percentage", "type": "quantitative", "title": "% of limit"},
    {"field": "runs_out", "type": "nominal", "title": "runs out (local)"},
]
_TODAY_X = {"field": "time", "type": "temporal", "title": None, "axis": {"format": "%H:%M"}}
_TODAY_Y = {"field": "percentage", "type": "quantitative", "title": "% of limit"}

ALERTS_PANEL = f"""WITH recent AS (
  SELECT usage_local_time(ts, {TZ}) AS "time", pool, coalesce(label, key_id) AS "key",
         CASE WHEN threshold IS NULL THEN 'forecast' ELSE printf('%g %%', threshold) END AS threshold,
         used, "limit", CASE delivered WHEN 1 THEN 'yes' ELSE 'no' END AS delivered, message
    FROM alerts LEFT JOIN (SELECT key_id AS k, label FROM key_limits GROUP BY key_id) ON k = alerts.key_id
   ORDER BY alerts.id DESC LIMIT 20
)
SELECT * FROM recent
UNION ALL
SELECT 'no alerts yet', NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE NOT EXISTS (SELECT 1 FROM recent)"""

KEY_LIMITS_PANEL = f"""SELECT pool || ' / ' || coalesce(label, key_id) AS scope, * FROM ({KEY_STATUS})"""

DASHBOARD: dict[str, Any] = {
    "title": "OpenAI usage",
    "description": "Tokens, pools, costs and blocked requests metered by the proxy. "
    "Refreshes every 10 s; pick a date range (local days) below, the default is the last 14 days.",
    "settings": {"allow_fullscreen": True, "autorefresh": 1 / 6},
    "layout": [
        ["tokens-today", "cost-today", "requests-today", "blocked-today"],
        ["today-by-hour", "today-by-hour", "pools-today", "pools-today"],
        ["today-by-hour", "today-by-hour", "key-limits", "key-limits"],
        ["tokens-per-day", "tokens-per-day", "cost-per-day", "cost-per-day"],
        ["cost-by-user", "cost-by-user", "top-models", "top-keys"],
        ["alerts", "alerts", "alerts", "alerts"],
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
        "pools-today": _share_bars(
            "Pools: share of the limit used in the current window",
            f"""SELECT * FROM ({STATUS}) WHERE "limit" IS NOT NULL""",
            category="pool", step=36, x_title="% of limit",
            label="format(datum.percentage, '.1f') + '% of ' + format(datum.limit, ',')",
            tooltip=["used", "limit", "percentage", "resets_at"],
            bar={"mark": {"type": "bar", "tooltip": True},
                 "encoding": {"color": {"condition": [{"test": "datum.percentage >= 100", "value": "#d62728"},
                                                      {"test": "datum.percentage >= 80", "value": "#ff7f0e"}],
                                        "value": "#4c78a8"}}},
        ),
        "today-by-hour": {
            "title": "Today by hour: each pool's use of its limit (day, week and month pools), and where it is "
                     "heading at the last hour's pace (dashed, to where it runs out)",
            "db": DB,
            "query": TODAY_BY_HOUR,
            "library": "vega-lite",
            "display": {
                "height": 300,
                "layer": [
                    {
                        "transform": [{"filter": "datum.series == 'used'"}],
                        "mark": {"type": "line", "point": True, "tooltip": True, "interpolate": "monotone"},
                        "encoding": {"x": _TODAY_X, "y": _TODAY_Y, "color": {"field": "pool", "type": "nominal"},
                                     "tooltip": _TODAY_TOOLTIP},
                    },
                    {
                        "transform": [{"filter": "datum.series == 'projection'"}],
                        "mark": {"type": "line", "strokeDash": [6, 4], "point": False, "tooltip": True},
                        "encoding": {"x": _TODAY_X, "y": _TODAY_Y, "color": {"field": "pool", "type": "nominal"},
                                     "tooltip": _TODAY_TOOLTIP},
                    },
                    {
                        "mark": {"type": "rule", "color": "#d62728", "strokeWidth": 1.5},
                        "encoding": {"y": {"datum": 100}},
                    },
                    {
                        "mark": {"type": "text", "align": "left", "dx": 4, "dy": -6, "color": "#d62728"},
                        "encoding": {"y": {"datum": 100}, "x": {"aggregate": "min", "field": "time",
                                                                "type": "temporal"},
                                     "text": {"value": "limit"}},
                    },
                ],
            },
        },
        "key-limits": _share_bars(
            "Keys with their own limits: share used in the current window",
            KEY_LIMITS_PANEL,
            category="scope", step=30, x_title="% of the key's limit",
            label="format(datum.used, ',') + ' of ' + format(datum.limit, ',')",
            tooltip=["used", "limit", "reserved", "percentage", "resets_at",
                     {"field": "exhausted_at", "type": "nominal", "title": "runs out at (UTC)"}],
            bar={"mark": {"type": "bar", "tooltip": True, "color": "#72b7b2"}},
        ),
        "cost-by-user": {
            "title": "Cost by user per day (USD)",
            "db": DB,
            "query": f"""{RANGE}
SELECT day, coalesce(label, 'key ' || key_hint, '(no key)') AS user, round(coalesce(sum(cost_usd), 0), 6) AS cost_usd,
       coalesce(sum(total_tokens), 0) AS tokens, count(*) AS requests
  FROM requests, range
 WHERE {RANGE_WHERE}
 GROUP BY 1, 2 ORDER BY 1, 2""",
            "library": "vega-lite",
            "display": {
                "height": 220,
                "mark": {"type": "bar", "tooltip": True},
                "encoding": {
                    "x": {"field": "day", "type": "ordinal", "title": None},
                    "y": {"field": "cost_usd", "type": "quantitative", "title": "USD", "stack": "zero"},
                    "color": {"field": "user", "type": "nominal"},
                    "tooltip": [
                        {"field": "day", "type": "ordinal"},
                        {"field": "user", "type": "nominal"},
                        {"field": "cost_usd", "type": "quantitative", "title": "cost (USD)", "format": ".6f"},
                        {"field": "tokens", "type": "quantitative", "format": ","},
                        {"field": "requests", "type": "quantitative"},
                    ],
                },
            },
        },
        "alerts": {
            "title": "Latest alerts (times in the configured time zone)",
            "db": DB,
            "query": ALERTS_PANEL,
            "library": "table",
            "display": {},
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
       sum(cost_status = 'unknown_price') AS unpriced_requests
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
            "title": "Recent blocked requests (times in the configured time zone)",
            "db": DB,
            "query": f"""{RANGE},
blocked AS (
  SELECT usage_local_time(ts, {TZ}) AS "time", model, pool, coalesce(label, key_hint) AS "key", status, error
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
    audio_seconds="Audio duration billed (whisper-1), seconds; such rows have NULL tokens",
    cost_usd="Cost in USD of every billed component (genai-prices, the package's price table, the config's "
    "[prices]); NULL when a component the call used has no known price",
    cost_status="priced, free (a real 0: moderation), unknown_price (cost_usd NULL), no_usage",
    processing="How the call was billed: standard, batch, flex, priority, ...",
    audio_input_tokens="Audio input tokens (part of input_tokens), billed at the audio rate",
    audio_output_tokens="Audio output tokens (part of output_tokens), billed at the audio rate",
    image_input_tokens="Image input tokens (part of input_tokens), billed at the image rate",
    image_output_tokens="Image output tokens (part of output_tokens), billed at the image rate",
    cache_write_tokens="Tokens written to the prompt cache (part of input_tokens), billed at the cache-write rate",
    cached_audio_tokens="Cached audio input tokens (part of cached_tokens and audio_input_tokens)",
    tool_calls='Hosted tool calls, JSON: {"web_search": 3, "code_interpreter": 2, "container": 1}',
    characters="TTS input characters (tts-1, tts-1-hd bill per character)",
    images="Images of per-image models (DALL-E)",
    image_size="Image size asked (DALL-E prices depend on it)",
    image_quality="Image quality asked (DALL-E prices depend on it)",
    reported_total_tokens="OpenAI's own total_tokens, as answered",
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


def for_database(name: str) -> dict[str, Any]:
    """The metadata for a database file named NAME.db: as built for usage.db, the database renamed."""
    data = build()
    if name == DB:
        return data
    data = json.loads(json.dumps(data))  # a copy: build() shares the module's dashboard dicts
    data["databases"] = {name: data["databases"][DB]}
    for dashboard in data.get("plugins", {}).get("datasette-dashboards", {}).values():
        for item in [*dashboard.get("charts", {}).values(), *dashboard.get("filters", {}).values()]:
            if item.get("db") == DB:
                item["db"] = name
    data["description_html"] = data.get("description_html", "").replace(f"/{DB}/", f"/{name}/")
    return data


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
                    "key_limits": {
                        "description": "Keys with a limit of their own in a pool (the config's [keys]), as the proxy "
                        "last loaded them.",
                    },
                    "pool_windows": {"hidden": True},
                    "reservations": {"hidden": True},
                    "issued_keys": {"hidden": True},
                    "_sqlite_migrations": {"hidden": True},  # the schema's migrations (store/schema.py)
                },
                "queries": {
                    "status": _query(
                        STATUS,
                        "Pool status",
                        "Per pool, now: tokens used in the current window, the limit, what remains (after what "
                        "requests in flight reserved and what proxies hold spare for the next ones), the percentage "
                        "used, when the window started (or was last reset), when it resets and when it runs out at "
                        "the pace of the last hour (exhausted_at; null when not before the reset). Times in UTC.",
                    ),
                    "key_status": _query(
                        KEY_STATUS,
                        "Key limits",
                        "Per key with its own limit in a pool ([keys] in the config), now: the same figures as "
                        "status, counted over that key's requests.",
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


def write(out: TextIO) -> None:
    json.dump(build(), out, indent=2)
    out.write("\n")


if __name__ == "__main__":
    write(sys.stdout)
