"""The older tools' HTTP API and the admin routes, served by Datasette (datasette/plugin.py).

Their clients change only the base URL to the Datasette port:

    GET  /health                    {"status": "ok", "timestamp": ms}; 503 when the database cannot be read
    GET  /api/usage                 {"date", "<pool>": {"tokens_used", "limit", "percentage", ...}, "last_updated"}
    GET  /api/history?days=N[&date=YYYY-MM-DD]   {"snapshots": [{"timestamp", "date", "<pool>_tokens"}], "count"}
    GET  /api/alerts?days=N         {"alerts": [{"id", "timestamp", "tier", "tokens_used", ...}], "count"}
    POST /api/poll                  one `reconcile` run (needs OPENAI_ADMIN_KEY), else 400

Admin routes, only when USAGE_ADMIN_TOKEN is set (else 404), with the token
as `Authorization: Bearer` or `X-Admin-Token` (else 401):

    POST /api/reset/{pool}          (alias /api/collector/reset/{pool}) optional {"key_id", "note"}
    POST /admin/keys                {"label", "note"} -> the key (shown once) and its key_id
    POST /admin/keys/{key_id}/revoke
    GET  /admin/usage/{key_id}

Figures come from pool_status (the one computation the proxy, `status` and
`top` use); writes reuse published.record_reset, issued_keys.create/revoke and
ledger/reconcile.fetch, on Datasette's write thread or a thread of their own,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import os
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import sqlite_utils
from datasette.utils.asgi import Response

from addon import config as config_mod
from addon.ledger import pool_status, reconcile
from addon.ledger.published import record_reset
from addon.store import issued_keys, schema
from addon.windows import iso_utc, local_midnight, utc_now

ADMIN_TOKEN_ENV = "USAGE_ADMIN_TOKEN"
CONFIG_ENV = "USAGE_CONFIG"  # the proxy's config file (python -m addon run passes it); optional
MAX_LABEL, MAX_NOTE = 200, 1000  # an issued key's label (as rows keep it) and note
REDIS_ENV = "USAGE_REDIS"  # the Redis the proxies share: resets over HTTP reset it too (see README: Several hosts)
PREFIXES = ("/api/", "/admin/")
MAX_DAYS = 366


def _error(status: int, message: str, **headers: str) -> Response:
    return Response.json({"error": message}, status=status, headers=headers or None)


def _db(datasette):
    return datasette.get_database()


def _config() -> config_mod.Config | None:
    path = os.environ.get(CONFIG_ENV)
    return config_mod.load(path) if path else None


def _days(request, default: int = 7) -> int | Response:
    text = request.args.get("days") or str(default)
    try:
        days = int(text)
    except ValueError:
        return _error(400, f"days must be a whole number, not {text!r}")
    if not 1 <= days <= MAX_DAYS:
        return _error(400, f"days must be between 1 and {MAX_DAYS}")
    return days


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def _forbidden(request, datasette) -> Response | None:
    """None when the actor may read the database: the read routes follow Datasette's own `allow` rules."""
    db = _db(datasette)
    for action, resource in (("view-instance", None), ("view-database", db.name)):
        if not await datasette.permission_allowed(request.actor, action, resource, default=True):
            return _error(403, "not allowed to read this database (log in first)")
    return None


async def _statuses(datasette) -> list[dict[str, Any]]:
    # One statement: the status is computed inside one read transaction.
    result = await _db(datasette).execute("SELECT usage_status_json() AS s")
    return json.loads(result.first()["s"])


def _tz_of(statuses: list[dict[str, Any]]) -> ZoneInfo:
    return ZoneInfo(statuses[0]["timezone"] if statuses and statuses[0]["timezone"] else "UTC")


class Reading(NamedTuple):
    """What every read route starts from: `?days=` (0 when the route takes none), the pools' status, their timezone."""

    days: int
    statuses: list[dict[str, Any]]
    tz: ZoneInfo


async def _reading(request, datasette, *, admin: bool = False, days: bool = True) -> Reading | Response:
    """The first lines of a read route, or the Response that refuses it: who may read (Datasette's own
    rules, or the admin token for `admin` routes), then `?days=`, then the status of every pool."""
    refused = _refused(request) if admin else await _forbidden(request, datasette)
    if refused:
        return refused
    wanted = _days(request) if days else 0
    if isinstance(wanted, Response):
        return wanted
    statuses = await _statuses(datasette)
    return Reading(wanted, statuses, _tz_of(statuses))


# -- the old API -------------------------------------------------------------------
async def health(request, datasette):
    now = utc_now()
    try:
        await _db(datasette).execute("SELECT max(id) FROM requests")
    except Exception as exc:
        return Response.json({"status": "error", "error": f"database not readable: {exc}", "timestamp": _ms(now)},
                             status=503)
    return Response.json({"status": "ok", "timestamp": _ms(now)})


async def usage(request, datasette):
    reading = await _reading(request, datasette, days=False)
    if isinstance(reading, Response):
        return reading
    now = utc_now()
    body: dict[str, Any] = {"date": now.astimezone(reading.tz).date().isoformat()}
    for row in reading.statuses:
        if row["key_id"] is not None:
            continue
        body[row["pool"]] = {
            "tokens_used": row["used"],
            "limit": row["limit"],
            "percentage": row["percentage"],
            "remaining": row["remaining"],
            "reserved": row["reserved"],
            "window": row["window"],
            "window_start": row["window_start"],
            "resets_at": row["resets_at"],
            "exhausted_at": row["exhausted_at"],
        }
    body["last_updated"] = int(now.timestamp())
    return Response.json(body)


async def history(request, datasette):
    reading = await _reading(request, datasette)
    if isinstance(reading, Response):
        return reading
    days, tz = reading.days, reading.tz
    pools = list(dict.fromkeys(row["pool"] for row in reading.statuses))
    now = utc_now()
    date = request.args.get("date")
    db = _db(datasette)
    snapshots: list[dict[str, Any]] = []
    if date:
        # One snapshot per local hour of that day: tokens used that day up to the hour's end.
        try:
            day = datetime.strptime(date, "%Y-%m-%d").date()
        except ValueError:
            return _error(400, f"date must be YYYY-MM-DD, not {date!r}")
        result = await db.execute(
            "SELECT CAST(substr(usage_local_time(ts, :tz), 12, 2) AS INTEGER) AS hour, pool,"
            " coalesce(sum(total_tokens), 0) AS tokens FROM requests WHERE day = :day GROUP BY 1, 2 ORDER BY 1",
            {"tz": tz.key, "day": day.isoformat()})
        hours: dict[int, dict[str, int]] = {}
        for row in result.rows:
            hours.setdefault(row["hour"], {})[row["pool"]] = row["tokens"]
        running = dict.fromkeys(pools, 0)
        midnight = local_midnight(day, tz)
        for hour in sorted(hours):
            for pool, tokens in hours[hour].items():
                running[pool] = running.get(pool, 0) + tokens
            end = min(midnight + timedelta(hours=hour + 1), now)
            snapshots.append({"timestamp": _ms(end), "date": day.isoformat(),
                              **{f"{pool}_tokens": tokens for pool, tokens in running.items()}})
    else:
        # One snapshot per local day: the day's tokens per pool, as of its end (today: now).
        today = now.astimezone(tz).date()
        first = today - timedelta(days=days - 1)
        result = await db.execute(
            "SELECT day, pool, coalesce(sum(total_tokens), 0) AS tokens FROM requests WHERE day >= :first"
            " GROUP BY day, pool ORDER BY day", {"first": first.isoformat()})
        by_day: dict[str, dict[str, int]] = {}
        for row in result.rows:
            if row["pool"] is not None:
                by_day.setdefault(row["day"], {})[row["pool"]] = row["tokens"]
        for offset in range(days):
            day = first + timedelta(days=offset)
            end = min(local_midnight(day + timedelta(days=1), tz), now)
            tokens = by_day.get(day.isoformat(), {})
            snapshots.append({"timestamp": _ms(end), "date": day.isoformat(),
                              **{f"{pool}_tokens": tokens.get(pool, 0) for pool in dict.fromkeys([*pools, *tokens])}})
    return Response.json({"snapshots": snapshots, "count": len(snapshots)})


async def alerts(request, datasette):
    reading = await _reading(request, datasette)
    if isinstance(reading, Response):
        return reading
    tz = reading.tz
    since = local_midnight(utc_now().astimezone(tz).date() - timedelta(days=reading.days - 1), tz)
    result = await _db(datasette).execute(
        'SELECT id, ts, pool, key_id, threshold, used, "limit", message, delivered FROM alerts'
        " WHERE ts >= :since ORDER BY ts DESC, id DESC", {"since": iso_utc(since)})
    out = []
    for row in result.rows:
        limit = row["limit"]
        out.append({
            "id": row["id"],
            "timestamp": _ms(pool_status.parse_ts(row["ts"])),
            "tier": _tier(row["threshold"]),
            "tokens_used": row["used"],
            "limit_value": limit,
            "percentage": round(100.0 * row["used"] / limit, 2) if limit else None,
            "message": row["message"],
            "sent": bool(row["delivered"]),
            "created_at": row["ts"],
            "pool": row["pool"],
            "key_id": row["key_id"],
        })
    return Response.json({"alerts": out, "count": len(out)})


def _tier(threshold: float | None) -> float | int | str:
    if threshold is None:
        return "forecast"
    return int(threshold) if float(threshold).is_integer() else threshold


async def poll(request, datasette):
    if request.method != "POST":
        return _error(405, "use POST", allow="POST")
    if forbidden := await _forbidden(request, datasette):
        return forbidden
    key = os.environ.get("OPENAI_ADMIN_KEY", "")
    if not key:
        return _error(400, "no OpenAI admin key configured: set OPENAI_ADMIN_KEY (sk-admin-...) in the environment "
                           "of the Datasette process (python -m addon run passes its own on)")
    days = _days(request)
    if isinstance(days, Response):
        return days
    path = _db(datasette).path
    base_url = os.environ.get("OPENAI_ADMIN_BASE_URL", reconcile.DEFAULT_BASE_URL)

    def run() -> dict[str, Any]:
        db = schema.connect(path)
        try:
            schema.migrate(db)
            usage_rows, cost_rows = reconcile.fetch(db, reconcile.Client(key, base_url), days=days, width="1d")
            return {"fetched": {"usage_rows": usage_rows, "cost_rows": cost_rows},
                    "rows": reconcile.compare(db, days=days, width="1d")}
        finally:
            db.conn.close()

    try:
        body = await asyncio.to_thread(run)  # network and SQLite: off the event loop
    except reconcile.ReconcileError as exc:
        return _error(502, str(exc))
    return Response.json(body)


# -- admin -------------------------------------------------------------------------
def presented_token(request) -> str | None:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("x-admin-token")


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant time: both are hashed first, so neither content nor length shows in the timing."""
    if presented is None:
        return False
    return hmac.compare_digest(hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest(),
                               hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest())


def _refused(request) -> Response | None:
    """None when the request may use an admin route."""
    expected = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not expected:
        return _error(404, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} in the Datasette process's environment")
    if not token_matches(presented_token(request), expected):
        return _error(401, "admin token missing or wrong (Authorization: Bearer ... or X-Admin-Token)",
                      **{"www-authenticate": 'Bearer realm="openai-usage-meter"'})
    return None


async def _json_body(request) -> dict[str, Any] | Response:
    raw = await request.post_body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "the body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    return body


async def _admin_post(request) -> dict | Response:
    """The JSON body of an admin POST, or the Response that refuses it (token, method, body)."""
    refused = _refused(request)
    if refused:
        return refused
    if request.method != "POST":
        return _error(405, "use POST", allow="POST")
    return await _json_body(request)


async def reset_pool(request, datasette):
    body = await _admin_post(request)
    if isinstance(body, Response):
        return body
    pool = request.url_vars["pool"]
    key_id = body.get("key_id") or body.get("key") or request.args.get("key_id") or request.args.get("key")
    note = body.get("note") or "HTTP /api/reset"
    pools = {row["pool"] for row in await _statuses(datasette)}
    if pool not in pools:
        return _error(404, f"unknown pool {pool!r} (pools: {', '.join(sorted(pools))})")

    shared = os.environ.get(REDIS_ENV, "").strip()
    if shared:  # the pools the proxies share (usage_redis): every proxy counts anew
        def reset_in_redis() -> None:
            from addon.ledger.redis_ledger import reset_shared
            from addon.store.redis_rows import ping

            with ping(shared) as client:
                reset_shared(client, pool, key_id)

        try:
            await asyncio.to_thread(reset_in_redis)
        except ConnectionError as exc:
            return _error(503, str(exc))

    def write(conn):
        with conn:
            return record_reset(conn, pool, key_id, str(note), utc_now())

    stamp = await _db(datasette).execute_write_fn(write)
    return Response.json({"pool": pool, "key_id": key_id, "reset_at": stamp,
                          "message": f"usage before {stamp} no longer counts in the current window"})


async def create_key(request, datasette):
    body = await _admin_post(request)
    if isinstance(body, Response):
        return body
    label = str(body.get("label") or "").strip()
    if not label:
        return _error(400, "label is required")
    note = body.get("note")
    if len(label) > MAX_LABEL or (note is not None and len(str(note)) > MAX_NOTE):
        return _error(400, f"label is limited to {MAX_LABEL} characters and note to {MAX_NOTE}")
    config = _config()
    settings = config.issued_keys if config else config_mod.IssuedKeysSettings()

    def write(conn):
        db = sqlite_utils.Database(conn)
        schema.migrate(db)
        key, row = issued_keys.create(db, label, settings.prefix)
        if note is not None:
            with conn:
                conn.execute("UPDATE issued_keys SET note = ? WHERE key_hash = ?", (str(note), row.key_hash))
        return key, row

    key, row = await _db(datasette).execute_write_fn(write)
    return Response.json({"key": key, "key_id": row.key_id, "key_hint": row.key_hint, "label": row.label,
                          "note": note, "created_at": row.created_at,
                          "message": "the key is shown only this once"}, status=201)


async def revoke_key(request, datasette):
    refused = _refused(request)
    if refused:
        return refused
    if request.method != "POST":
        return _error(405, "use POST", allow="POST")
    key_id = request.url_vars["key_id"]

    def write(conn):
        return issued_keys.revoke(sqlite_utils.Database(conn), key_id)

    revoked = await _db(datasette).execute_write_fn(write)
    if not revoked:
        return _error(404, f"no active issued key {key_id!r}")
    return Response.json({"revoked": [{"key_id": k.key_id, "label": k.label, "key_hint": k.key_hint}
                                      for k in revoked]})


async def key_usage(request, datasette):
    reading = await _reading(request, datasette, admin=True)
    if isinstance(reading, Response):
        return reading
    key_id = request.url_vars["key_id"]
    first = (utc_now().astimezone(reading.tz).date() - timedelta(days=reading.days - 1)).isoformat()
    db = _db(datasette)
    per_day = await db.execute(
        "SELECT day, count(*) AS requests, coalesce(sum(total_tokens), 0) AS tokens, round(sum(cost_usd), 9)"
        " AS cost_usd, coalesce(sum(outcome = 'blocked'), 0) AS blocked FROM requests"
        " WHERE key_id = :key AND day >= :first GROUP BY day ORDER BY day", {"key": key_id, "first": first})
    latest = (await db.execute("SELECT key_hint, label, max(ts) AS last_seen FROM requests WHERE key_id = :key",
                               {"key": key_id})).first()
    try:
        issued = (await db.execute("SELECT label, key_hint, created_at, revoked_at FROM issued_keys"
                                   " WHERE key_id = :key", {"key": key_id})).first()
    except Exception:  # no issued_keys table in this database
        issued = None
    scopes = [row for row in reading.statuses if row["key_id"] == key_id]
    if not per_day.rows and issued is None and not scopes and latest["last_seen"] is None:
        return _error(404, f"nothing known about key {key_id!r}")
    return Response.json({
        "key_id": key_id,
        "label": (issued["label"] if issued else None) or latest["label"],
        "key_hint": (issued["key_hint"] if issued else None) or latest["key_hint"],
        "issued": dict(issued) if issued else None,
        "last_seen": latest["last_seen"],
        "limits": scopes,
        "days": [dict(row) for row in per_day.rows],
        "requests": sum(row["requests"] for row in per_day.rows),
        "tokens": sum(row["tokens"] for row in per_day.rows),
    })


# -- self-service keys (off by default) -----------------------------------------------
SELF_SERVICE_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Your OpenAI key</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:3em auto}} code{{background:#eee;padding:.3em;
word-break:break-all}} .error{{color:#b00}}</style></head>
<body><h1>Your OpenAI key</h1>{body}</body></html>"""


def _page(body: str, status: int = 200) -> Response:
    return Response.html(SELF_SERVICE_PAGE.format(body=body), status=status)


async def self_service(request, datasette):
    """[issued_keys] self_service = true: anyone who reaches Datasette may create a key for a new label."""
    config = _config()
    settings = config.issued_keys if config else config_mod.IssuedKeysSettings()
    if not settings.self_service:
        return _page("<p>Self-service keys are off (<code>[issued_keys] self_service = true</code> turns them "
                     "on).</p>", 404)
    csrftoken = request.scope["csrftoken"]() if "csrftoken" in request.scope else ""
    form = ('<form method="post"><label>Your name <input name="label" required maxlength="100"></label> '
            f'<input type="hidden" name="csrftoken" value="{html.escape(csrftoken)}">'
            '<button>Create my key</button></form>'
            "<p>The key is shown once. Usage and limits are counted under your name.</p>")
    if request.method != "POST":
        return _page(form)
    label = ((await request.post_vars()).get("label") or "").strip()
    if not label or len(label) > 100:
        return _page('<p class="error">Give your name.</p>' + form, 400)

    def write(conn):
        db = sqlite_utils.Database(conn)
        schema.migrate(db)
        # One active key per name: asking again does not hand out a second (an admin revokes the first).
        if any(k.label == label and k.revoked_at is None for k in issued_keys.load_all(conn)):
            return None
        key, row = issued_keys.create(db, label, settings.prefix)
        with conn:
            conn.execute("UPDATE issued_keys SET note = ? WHERE key_hash = ?", ("self-service", row.key_hash))
        return key, row

    created = await _db(datasette).execute_write_fn(write)
    if created is None:
        return _page(f'<p class="error">{html.escape(label)} has a key already; ask an admin to revoke it for a '
                     "new one.</p>", 409)
    key, row = created
    return _page(f"<p>Your key, <b>{html.escape(label)}</b> (shown only now):</p><p><code>{html.escape(key)}</code>"
                 f"</p><p>key id {row.key_id}</p>", 201)


ROUTES = [
    (r"^/health$", health),
    (r"^/api/usage$", usage),
    (r"^/api/history$", history),
    (r"^/api/alerts$", alerts),
    (r"^/api/poll$", poll),
    (r"^/api/(?:collector/)?reset/(?P<pool>[^/]+)$", reset_pool),
    (r"^/admin/keys$", create_key),
    (r"^/admin/keys/(?P<key_id>[^/]+)/revoke$", revoke_key),
    (r"^/admin/usage/(?P<key_id>[^/]+)$", key_usage),
    (r"^/-/keys$", self_service),
]
