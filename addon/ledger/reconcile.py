"""OpenAI's own count of the organization's usage against the proxy's rows.

Reads the organization Usage API (`/v1/organization/usage/completions`,
grouped by model) and Costs API (`/v1/organization/costs`, grouped by line
item) with an admin key, stores the buckets in `openai_usage` and
`openai_costs`, and compares per UTC day and model both sides, in tokens
(Usage API against the proxy's completions rows) and in USD (Costs API line
items, "<model>, <item>", against the `cost_usd` of every proxy row of that
model). Used by `python -m addon reconcile` (tools/reconcile.py) and the
HTTP API's `POST /api/poll` (datasette/http_api.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from addon import config as config_mod
from addon.metering.pools import PoolMatcher
from addon.windows import iso_utc

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Endpoints whose usage OpenAI reports under usage/completions.
COMPLETION_ENDPOINTS = ("chat.completions", "completions", "responses", "responses.get")
PAGE_LIMITS = {"1d": 31, "1h": 168}
TIMEOUT = 60.0


class ReconcileError(RuntimeError):
    """The Usage API could not be read; the message says why."""


# -- the API ---------------------------------------------------------------------
@dataclass
class Client:
    admin_key: str
    base_url: str = DEFAULT_BASE_URL

    def pages(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every bucket of a paginated organization endpoint."""
        buckets: list[dict[str, Any]] = []
        page: str | None = None
        for _ in range(1000):  # a runaway cursor must not loop forever
            query = {**params, **({"page": page} if page else {})}
            body = self.get(path, query)
            buckets.extend(body.get("data") or [])
            page = body.get("next_page")
            if not body.get("has_more") or not page:
                return buckets
        raise ReconcileError(f"{path}: more than 1000 pages; narrow the range with --days")

    def get(self, path: str, query: dict[str, Any]) -> dict[str, Any]:
        url = self.base_url.rstrip("/") + path + "?" + urllib.parse.urlencode(query, doseq=True)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.admin_key}",
                                                       "Accept": "application/json",
                                                       "User-Agent": "openai-usage-meter reconcile"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:2000]
            try:
                message = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = detail.decode("utf-8", "replace").strip() or exc.reason
            hint = " (an organization admin key, sk-admin-..., is needed)" if exc.code in (401, 403) else ""
            raise ReconcileError(f"GET {path}: HTTP {exc.code}: {message}{hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ReconcileError(f"GET {path}: {getattr(exc, 'reason', exc)}") from None


def _iso(epoch: int | float) -> str:
    return iso_utc(datetime.fromtimestamp(epoch, timezone.utc))


def usage_rows(buckets: list[dict[str, Any]], width: str, fetched_at: str) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for bucket in buckets:
        start, end = _iso(bucket["start_time"]), _iso(bucket["end_time"])
        for result in bucket.get("results") or []:
            model = result.get("model") or ""
            row = rows.setdefault((start, model), {
                "bucket_width": width, "start": start, "end": end, "model": model, "requests": 0,
                "input_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "fetched_at": fetched_at})
            # Several results per model when OpenAI groups by more (projects): add up.
            row["requests"] += result.get("num_model_requests") or 0
            row["input_tokens"] += result.get("input_tokens") or 0
            row["cached_tokens"] += result.get("input_cached_tokens") or 0
            row["output_tokens"] += result.get("output_tokens") or 0
    return list(rows.values())


def cost_rows(buckets: list[dict[str, Any]], fetched_at: str) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for bucket in buckets:
        start, end = _iso(bucket["start_time"]), _iso(bucket["end_time"])
        for result in bucket.get("results") or []:
            amount = result.get("amount") or {}
            item = result.get("line_item") or ""
            row = rows.setdefault((start, item), {"start": start, "end": end, "line_item": item, "amount_usd": 0.0,
                                                  "currency": amount.get("currency") or "usd",
                                                  "fetched_at": fetched_at})
            row["amount_usd"] += float(amount.get("value") or 0)
    return list(rows.values())


def fetch(db, client: Client, *, days: int, width: str, now: datetime | None = None) -> tuple[int, int]:
    """Read the last `days` days from OpenAI into the database; (usage rows, cost rows)."""
    now = now or datetime.now(timezone.utc)
    day0 = datetime(now.year, now.month, now.day, tzinfo=timezone.utc) - timedelta(days=days - 1)
    start, end = int(day0.timestamp()), int(now.timestamp()) + 1
    fetched_at = iso_utc(now)
    usage = client.pages("/organization/usage/completions", {
        "start_time": start, "end_time": end, "bucket_width": width, "group_by": "model",
        "limit": PAGE_LIMITS[width]})
    costs = client.pages("/organization/costs", {
        "start_time": start, "end_time": end, "bucket_width": "1d", "group_by": "line_item", "limit": 180})
    u_rows, c_rows = usage_rows(usage, width, fetched_at), cost_rows(costs, fetched_at)
    since = _iso(start)
    with db.conn:
        # Replace the range: a bucket OpenAI no longer reports must not linger.
        db.execute("DELETE FROM openai_usage WHERE bucket_width = ? AND start >= ?", [width, since])
        db.execute("DELETE FROM openai_costs WHERE start >= ?", [since])
        db.table("openai_usage").insert_all(u_rows, replace=True)
        db.table("openai_costs").insert_all(c_rows, replace=True)
    return len(u_rows), len(c_rows)


# -- the comparison -----------------------------------------------------------------
COMPARE_SQL = """
WITH openai AS (
  SELECT substr(start, 1, 10) AS day, model, SUM(requests) AS requests,
         SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens
  FROM openai_usage WHERE bucket_width = :width AND start >= :since GROUP BY 1, 2
), cost AS (
  -- line items read "gpt-4o-2024-08-06, input": the model is before the comma
  SELECT substr(start, 1, 10) AS day,
         CASE WHEN instr(line_item, ', ') > 0 THEN substr(line_item, 1, instr(line_item, ', ') - 1)
              ELSE line_item END AS model,
         SUM(amount_usd) AS cost_usd
  FROM openai_costs WHERE start >= :since GROUP BY 1, 2
), proxy AS (
  SELECT substr(ts, 1, 10) AS day, model, COUNT(*) AS requests,
         SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens
  FROM requests
  WHERE ts >= :since AND total_tokens IS NOT NULL AND endpoint IN ({endpoints})
  GROUP BY 1, 2
), proxy_cost AS (
  -- every billed call, whatever its endpoint: the Costs API has them all
  SELECT substr(ts, 1, 10) AS day, model, SUM(cost_usd) AS cost_usd,
         SUM(cost_status = 'unknown_price') AS unpriced
  FROM requests
  WHERE ts >= :since AND cost_status IN ('priced', 'free', 'unknown_price')
  GROUP BY 1, 2
), keys AS (
  SELECT day, model FROM openai UNION SELECT day, model FROM proxy UNION SELECT day, model FROM cost
  UNION SELECT day, model FROM proxy_cost
)
SELECT keys.day, keys.model,
       openai.requests AS openai_requests, proxy.requests AS proxy_requests,
       COALESCE(openai.input_tokens, 0) + COALESCE(openai.output_tokens, 0) AS openai_tokens,
       COALESCE(proxy.input_tokens, 0) + COALESCE(proxy.output_tokens, 0) AS proxy_tokens,
       openai.input_tokens AS openai_input_tokens, proxy.input_tokens AS proxy_input_tokens,
       openai.output_tokens AS openai_output_tokens, proxy.output_tokens AS proxy_output_tokens,
       cost.cost_usd AS openai_cost_usd, proxy_cost.cost_usd AS proxy_cost_usd,
       COALESCE(proxy_cost.unpriced, 0) AS proxy_unpriced_requests
FROM keys
LEFT JOIN openai ON openai.day = keys.day AND openai.model IS keys.model
LEFT JOIN proxy ON proxy.day = keys.day AND proxy.model IS keys.model
LEFT JOIN cost ON cost.day = keys.day AND cost.model IS keys.model
LEFT JOIN proxy_cost ON proxy_cost.day = keys.day AND proxy_cost.model IS keys.model
ORDER BY keys.day DESC, keys.model
""".replace("{endpoints}", ", ".join(f"'{e}'" for e in COMPLETION_ENDPOINTS))


def compare(db, *, days: int, width: str, now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or datetime.now(timezone.utc)
    first_day = datetime(now.year, now.month, now.day, tzinfo=timezone.utc) - timedelta(days=days - 1)
    since = first_day.strftime("%Y-%m-%d")
    cursor = db.conn.execute(COMPARE_SQL, {"width": width, "since": since})
    names = [d[0] for d in cursor.description]
    out = []
    for values in cursor.fetchall():
        row = dict(zip(names, values, strict=True))
        row["difference_tokens"] = row["openai_tokens"] - row["proxy_tokens"]
        # What OpenAI billed that the proxy's costs do not account for (rows
        # without a known price make the proxy's figure a lower bound).
        row["difference_usd"] = round((row["openai_cost_usd"] or 0) - (row["proxy_cost_usd"] or 0), 9)
        out.append(row)
    return out


# -- alerts on OpenAI's figures --------------------------------------------------------
def evaluate_alerts(db, config: config_mod.Config, width: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """Fire the pools' thresholds on what OpenAI counted in the current window.

    Uses the same dedupe key as the proxy (pool|key|window|threshold), so an
    alert fires once whichever side sees the crossing first. Rolling windows
    are skipped (buckets are whole days or hours); with daily buckets, windows
    that do not start at UTC midnight are approximated by the buckets that
    begin inside them.
    """
    from addon.ledger import alerts as alerts_mod
    from addon.ledger.pool_status import PoolStatus

    now = now or datetime.now(timezone.utc)
    matcher = PoolMatcher(config)
    used_by_pool: dict[str, int] = {}
    statuses = []
    for pool in config.pools.values():
        if pool.limit is None or pool.window.is_rolling:
            continue
        start, end = pool.window.bounds(now, config.timezone)
        rows = db.conn.execute(
            "SELECT model, SUM(input_tokens + output_tokens) FROM openai_usage"
            " WHERE bucket_width = ? AND start >= ? AND start < ? GROUP BY model",
            (width, iso_utc(start), iso_utc(end)),
        ).fetchall()
        used = sum(tokens or 0 for model, tokens in rows if model and matcher.pool_for(model) == pool.name)
        used_by_pool[pool.name] = used
        statuses.append(PoolStatus(pool.name, None, None, pool.window.kind, pool.limit, used, 0, start, end))
    thresholds = {pool.name: pool.thresholds for pool in config.pools.values()}
    sender = alerts_mod.WebhookSender(config.webhook, db_path_of(db)) if config.webhook else None
    try:
        with db.conn:
            fired = alerts_mod.AlertEvaluator(sender).evaluate(db, statuses, thresholds, now)
    finally:
        if sender is not None:
            sender.close(timeout=30)
    return fired


def db_path_of(db) -> str:
    return db.conn.execute("PRAGMA database_list").fetchone()[2]
