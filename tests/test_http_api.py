"""The older tools' HTTP API and the admin routes, through the real `python -m addon run`.

One `run` (proxy + Datasette with the package's plugin) per module, with
USAGE_ADMIN_TOKEN and an OpenAI admin key pointing at the fake server's
organization API; traffic goes through the proxy with the real SDK. A
second `run` without them checks that the admin routes are off and that
the console stays quiet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import openai
import pytest
from conftest import FAKE_KEY, ROOT, free_port, wait_port
from fake_openai import FakeServer

from addon.metering.wire import key_id

TOKEN = "s3cret-admin-token-0123456789"
ADMIN_KEY = "sk-admin-test0123456789"
BOB = key_id(FAKE_KEY)
CONFIG = f"""
timezone = "Europe/Paris"
default_pool = "premium"

[pools.premium]
limit = 20_000
window = "day"
models = ["gpt-4o", "gpt-5"]
alerts = [0.1, 100]

[pools.mini]
limit = 1_000_000
window = "rolling:24h"
models = ["gpt-4o-mini"]

[keys.{BOB}]
label = "bob"
limits = {{ premium = 15_000 }}

[issued_keys]
enabled = true
upstream_key_env = "OPENAI_API_KEY"
self_service = true
"""


class Run:
    """`python -m addon run` in a session of its own, with its console captured."""

    def __init__(self, tmp: Path, confdir: Path, fake_port: int, env: dict[str, str], *extra: str) -> None:
        self.db = tmp / "usage.db"
        self.config = tmp / "config.toml"
        self.config.write_text(CONFIG)
        self.proxy_port, self.ui_port = free_port(), free_port()
        self.out = tmp / "run.log"
        base_env = {k: v for k, v in os.environ.items() if k not in ("USAGE_ADMIN_TOKEN", "OPENAI_ADMIN_KEY")}
        full_env = {**base_env, "FAKE_OPENAI_ADDR": f"127.0.0.1:{fake_port}", "PYTHONUNBUFFERED": "1",
                    "OPENAI_API_KEY": FAKE_KEY, **env}
        cmd = [sys.executable, "-m", "addon", "run", "--db", str(self.db), "--config", str(self.config),
               "--proxy-port", str(self.proxy_port), "--datasette-port", str(self.ui_port), *extra, "--",
               "-s", str(ROOT / "tests" / "route.py"), "--set", f"confdir={confdir}", "--set", "ssl_insecure=true"]
        with open(self.out, "wb") as handle:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.confdir = confdir
        try:
            wait_port(self.proxy_port, timeout=60, proc=self.proc)
            wait_port(self.ui_port, timeout=60, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(self.out.read_text(errors="replace")) from None

    def client(self, api_key: str = FAKE_KEY) -> openai.OpenAI:
        return openai.OpenAI(api_key=api_key, max_retries=0, http_client=openai.DefaultHttpxClient(
            proxy=f"http://127.0.0.1:{self.proxy_port}", verify=str(self.confdir / "mitmproxy-ca-cert.pem")))

    def call(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.ui_port}{path}", data=data, method=method,
                                         headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read()), response.headers
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null"), exc.headers

    def rows(self, where: str = "1") -> list[dict]:
        import sqlite3

        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"select * from requests where {where} order by id")]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def wait_rows(self, count: int, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(rows := self.rows()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return rows

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def admin_api(fake_server):
    """A plain-HTTP twin of the fake server (its organization Usage/Costs API), sharing its records."""
    twin = FakeServer(tls=False)
    twin.state = fake_server.state
    twin.start()
    yield twin
    twin.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory, confdir, fake_server, admin_api):
    run = Run(tmp_path_factory.mktemp("http-api"), confdir, fake_server.port,
              {"USAGE_ADMIN_TOKEN": TOKEN, "OPENAI_ADMIN_KEY": ADMIN_KEY,
               "OPENAI_ADMIN_BASE_URL": f"http://127.0.0.1:{admin_api.port}/v1"})
    client = run.client()
    for model in ("gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-5"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello " * 20}])
    run.wait_rows(4)
    yield run
    run.stop()


def test_health(served):
    status, body, _ = served.call("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert abs(body["timestamp"] - time.time() * 1000) < 60_000


def test_api_usage_is_the_old_shape_and_agrees_with_the_rows_and_status(served):
    status, body, _ = served.call("GET", "/api/usage")
    assert status == 200
    assert set(body) >= {"date", "premium", "mini", "last_updated"}
    paris_today = datetime.now(timezone.utc).astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris")).date()
    assert body["date"] == paris_today.isoformat()
    assert abs(body["last_updated"] - time.time()) < 60
    rows = served.rows()
    canned = {s["pool"]: s for s in served.call("GET", "/usage/status.json?_shape=array")[1]}
    for pool in ("premium", "mini"):
        used = sum(r["total_tokens"] or 0 for r in rows if r["pool"] == pool)
        assert used > 0
        figures = body[pool]
        assert figures["tokens_used"] == used == canned[pool]["used"]
        assert figures["limit"] == canned[pool]["limit"]
        assert figures["percentage"] == pytest.approx(round(100 * used / figures["limit"], 2))
        assert set(figures) >= {"tokens_used", "limit", "percentage", "remaining", "resets_at", "exhausted_at"}


def test_api_history_days_and_hours(served):
    status, body, _ = served.call("GET", "/api/history?days=3")
    assert status == 200 and body["count"] == len(body["snapshots"]) == 3
    today = body["snapshots"][-1]
    rows = served.rows()
    assert today["date"] == rows[-1]["day"]
    assert today["premium_tokens"] == sum(r["total_tokens"] or 0 for r in rows if r["pool"] == "premium")
    assert body["snapshots"][0]["premium_tokens"] == 0
    assert all(set(s) >= {"timestamp", "date", "premium_tokens", "mini_tokens"} for s in body["snapshots"])
    status, body, _ = served.call("GET", f"/api/history?days=1&date={today['date']}")
    assert status == 200 and body["count"] >= 1
    assert body["snapshots"][-1]["premium_tokens"] == today["premium_tokens"]  # cumulative over the day's hours
    assert served.call("GET", "/api/history?days=x")[0] == 400
    assert served.call("GET", "/api/history?date=yesterday")[0] == 400


def test_api_alerts(served):
    deadline = time.monotonic() + 20  # the proxy evaluates alerts once a second
    while time.monotonic() < deadline:
        status, body, _ = served.call("GET", "/api/alerts?days=1")
        if body["count"]:
            break
        time.sleep(0.2)
    assert status == 200 and body["count"] >= 1
    alert = body["alerts"][0]
    assert set(alert) >= {"id", "timestamp", "tier", "tokens_used", "limit_value", "percentage", "message", "sent",
                          "created_at"}
    assert alert["limit_value"] in (20_000, 15_000) and alert["tier"] == 0.1 and alert["sent"] is False
    assert alert["percentage"] == pytest.approx(round(100 * alert["tokens_used"] / alert["limit_value"], 2))


def test_api_poll_runs_reconcile(served, admin_api):
    status, body, _ = served.call("POST", "/api/poll?days=1")
    assert status == 200, body
    assert body["fetched"]["usage_rows"] >= 1
    assert any(r["proxy_tokens"] for r in body["rows"])
    assert admin_api.state.calls("/organization/usage/completions")
    assert served.call("GET", "/api/poll")[0] == 405


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-Admin-Token": TOKEN[:-1]},
                                     {"Authorization": TOKEN}, {"X-Admin-Token": TOKEN + "x"}])
def test_admin_routes_need_the_token(served, headers):
    for method, path in (("POST", "/api/reset/premium"), ("POST", "/admin/keys"), ("GET", f"/admin/usage/{BOB}"),
                         ("POST", "/admin/keys/abc/revoke"), ("POST", "/api/collector/reset/mini")):
        status, body, response_headers = served.call(method, path, {"label": "x"}, headers)
        assert status == 401, (method, path, body)
        assert "Bearer" in response_headers["www-authenticate"]


def test_admin_keys_create_use_usage_revoke(served):
    # A label as long as a database can hold is refused, not stored.
    status, body, _ = served.call("POST", "/admin/keys", {"label": "x" * 100_000}, {"X-Admin-Token": TOKEN})
    assert status == 400 and "200 characters" in body["error"]
    status, body, _ = served.call("POST", "/admin/keys", {"label": "carol", "note": "ticket 42"},
                                  {"X-Admin-Token": TOKEN})
    assert status == 201, body
    key, kid = body["key"], body["key_id"]
    assert key.startswith("sk-usr-") and kid == key_id(key) and body["label"] == "carol"
    # The proxy takes the new key within about a second, meters it under its label.
    client = served.client(api_key=key)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while not served.rows(f"key_id = '{kid}' and outcome = 'ok'") and time.monotonic() < deadline:
        time.sleep(0.05)
    status, usage, _ = served.call("GET", f"/admin/usage/{kid}", headers=AUTH)
    assert status == 200
    assert usage["label"] == "carol" and usage["issued"]["revoked_at"] is None
    ok_rows = served.rows(f"key_id = '{kid}'")
    assert usage["requests"] == len(ok_rows) and usage["tokens"] == sum(r["total_tokens"] or 0 for r in ok_rows)
    status, body, _ = served.call("POST", f"/admin/keys/{kid}/revoke", headers=AUTH)
    assert status == 200 and body["revoked"][0]["key_id"] == kid
    assert served.call("POST", f"/admin/keys/{kid}/revoke", headers=AUTH)[0] == 404
    deadline = time.monotonic() + 10
    while True:
        try:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.2)
    assert served.call("GET", "/admin/usage/000000000000", headers=AUTH)[0] == 404
    assert served.call("POST", "/admin/keys", {"note": "no label"}, AUTH)[0] == 400


def test_self_service_key_page(served):
    """[issued_keys] self_service = true: a form (with Datasette's CSRF token) hands out one key per name."""
    import http.cookiejar
    import re
    import urllib.parse

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    url = f"http://127.0.0.1:{served.ui_port}/-/keys"
    with opener.open(url, timeout=30) as response:
        page = response.read().decode()
    token = re.search(r'name="csrftoken" value="([^"]+)"', page).group(1)

    def post(label: str, csrftoken: str = token) -> tuple[int, str]:
        data = urllib.parse.urlencode({"label": label, "csrftoken": csrftoken}).encode()
        try:
            with opener.open(url, data=data, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    status, page = post("dave")
    assert status == 201, page
    key = re.search(r"<code>(sk-usr-[^<]+)</code>", page).group(1)
    assert served.call("GET", f"/admin/usage/{key_id(key)}", headers=AUTH)[1]["label"] == "dave"
    assert post("dave")[0] == 409  # one active key per name
    assert post("eve", csrftoken="forged")[0] == 403  # Datasette's CSRF protection holds for the form


def test_admin_usage_lists_key_limits(served):
    status, usage, _ = served.call("GET", f"/admin/usage/{BOB}", headers=AUTH)
    assert status == 200 and usage["label"] == "bob"
    (limit,) = usage["limits"]
    assert limit["pool"] == "premium" and limit["limit"] == 15_000
    assert limit["used"] == sum(r["total_tokens"] or 0 for r in served.rows(f"key_id = '{BOB}' and pool = 'premium'"))


def test_reset_over_http(served):
    """Last in this module: it zeroes the pools."""
    status, body, _ = served.call("POST", "/api/reset/premium", {"note": "from a script"}, AUTH)
    assert status == 200 and body["pool"] == "premium"
    assert served.call("GET", "/api/usage")[1]["premium"]["tokens_used"] == 0
    assert served.call("POST", "/api/collector/reset/mini", headers={"X-Admin-Token": TOKEN})[0] == 200
    assert served.call("GET", "/api/usage")[1]["mini"]["tokens_used"] == 0
    assert served.call("POST", "/api/reset/nope", headers=AUTH)[0] == 404
    # The proxy counts from the reset too: the CLI (same computation) says so.
    result = subprocess.run([sys.executable, "-m", "addon", "status", "--db", str(served.db), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    used = {r["pool"]: r["used"] for r in json.loads(result.stdout) if r["key_id"] is None}
    assert used == {"premium": 0, "mini": 0, "batch": 0}  # batch: the implicit track-only pool of batches


def test_without_token_admin_is_off_poll_explains_and_console_is_quiet(tmp_path, confdir, fake_server):
    run = Run(tmp_path, confdir, fake_server.port, {})
    try:
        client = run.client()
        for _ in range(5):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        run.wait_rows(5)
        for _ in range(5):
            assert run.call("GET", "/api/usage")[0] == 200
        for method, path in (("POST", "/api/reset/premium"), ("POST", "/admin/keys"), ("GET", f"/admin/usage/{BOB}")):
            status, body, _ = run.call(method, path, {"label": "x"}, AUTH)
            assert status == 404 and "USAGE_ADMIN_TOKEN" in body["error"]
        status, body, _ = run.call("POST", "/api/poll")
        assert status == 400 and "OPENAI_ADMIN_KEY" in body["error"]
        time.sleep(0.5)
        text = run.out.read_text(errors="replace")
        assert "chat/completions" not in text  # mitmdump's flow lines (flow_detail=0)
        assert "client connect" not in text  # nor its connection lines (termlog_verbosity=warn)
        assert "GET /api/usage" not in text  # Datasette's access log
        assert "Admin API:  off" in text
    finally:
        run.stop()


def test_read_routes_follow_datasettes_allow(tmp_path):
    """With `"allow"` at the top level (README, Before exposing Datasette), the old API is not readable either."""
    from test_datasette_helpers import Datasette, metadata

    from addon import config as config_mod
    from addon.ledger.published import write_pools
    from addon.store import schema

    db = schema.connect(tmp_path / "usage.db")
    schema.migrate(db)
    write_pools(db, config_mod.load(None))
    db.conn.close()
    locked = tmp_path / "metadata.json"
    locked.write_text(json.dumps({**metadata(), "allow": {"id": "admin"}}))
    ds = Datasette(tmp_path / "usage.db", tmp_path / "datasette.log", locked)
    try:
        for path in ("/api/usage", "/api/history", "/api/alerts", "/usage/status.json"):
            assert ds.get(path)[0] == 403, path
        status, body = ds.get("/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
    finally:
        ds.stop()
    open_ds = Datasette(tmp_path / "usage.db", tmp_path / "datasette-open.log")
    try:
        # batch: the implicit track-only pool of batches, a pool like `other`
        assert set(open_ds.json("/api/usage")) == {"date", "premium", "mini", "other", "batch", "last_updated"}
        assert open_ds.get("/-/keys")[0] == 404  # self-service keys are off by default
    finally:
        open_ds.stop()


def test_token_is_compared_in_constant_time(monkeypatch):
    """Every check goes through hmac.compare_digest on two SHA-256 digests: neither the content nor the
    length of the presented token changes what is compared."""
    import hmac

    from addon.datasette import http_api

    compared: list[tuple[int, int]] = []
    original = hmac.compare_digest

    def recording(a, b):
        compared.append((len(a), len(b)))
        return original(a, b)

    monkeypatch.setattr(http_api.hmac, "compare_digest", recording)
    for presented, expected in ((TOKEN, True), (TOKEN[:-1], False), ("", False), ("x" * 10_000, False),
                                (TOKEN + "\u00e9", False)):
        assert http_api.token_matches(presented, TOKEN) is expected
    assert compared == [(32, 32)] * 5
    assert http_api.token_matches(None, TOKEN) is False
