"""`python -m addon reconcile` against the fake server's organization Usage/Costs API."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone

import openai
import pytest
from conftest import ROOT
from fake_openai import FakeServer

from addon.tools import reconcile

ADMIN = "sk-admin-test0123456789"
CONFIG = """
timezone = "UTC"
default_pool = "premium"
[pools.premium]
limit = 300
window = "day"
models = ["gpt-4o", "gpt-5"]
[pools.mini]
limit = 1_000_000
window = "day"
models = ["gpt-4o-mini"]
"""


@pytest.fixture
def admin_api(fake_server):
    """A plain-HTTP twin of the fake server that shares its record of served usage."""
    fake_server.state.clear()
    twin = FakeServer(tls=False)
    twin.state = fake_server.state
    twin.start()
    yield twin
    twin.stop()


def run(db, base: str, *args: str, key: str = ADMIN, config=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "addon", "reconcile", "--db", str(db), "--base-url", base, "--admin-key", key]
    if config:
        command += ["--config", str(config)]
    return subprocess.run(command + list(args), cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_reconcile_shows_traffic_that_bypassed_the_proxy(make_proxy, admin_api, tmp_path):
    proxy = make_proxy()
    client = proxy.client()
    proxied = [client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi " * n}])
               for n in (1, 5)]
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "s"}], stream=True)
    assert len(list(stream)) > 1
    # A client that talks to "OpenAI" directly, around the proxy.
    direct = openai.OpenAI(api_key="sk-direct-0123456789abcdef", base_url=f"http://127.0.0.1:{admin_api.port}/v1")
    bypass = direct.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "sneaky"}])
    proxy.wait_rows(3)
    sent = [c.usage_sent for c in admin_api.state.calls("/chat/completions")]
    proxied_tokens = sum(u["total_tokens"] for u in sent) - bypass.usage.total_tokens
    assert proxied_tokens == sum(a.usage.total_tokens for a in proxied) + sent[2]["total_tokens"]

    result = run(proxy.db, f"http://127.0.0.1:{admin_api.port}/v1", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    rows = {r["model"]: r for r in out["rows"]}
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert {r["day"] for r in out["rows"]} == {today}
    seen = rows["gpt-4o-2024-08-06"]
    assert seen["openai_requests"] == seen["proxy_requests"] == 3
    assert seen["openai_tokens"] == seen["proxy_tokens"] == proxied_tokens
    assert seen["difference_tokens"] == 0
    missed = rows["gpt-4o-mini-2024-07-18"]
    assert missed["proxy_requests"] is None and missed["openai_requests"] == 1
    assert missed["difference_tokens"] == bypass.usage.total_tokens
    # Costs: the fake bills gpt-4o-mini at $0.15 / $0.075 cached / $0.60 per million tokens.
    cached = bypass.usage.prompt_tokens_details.cached_tokens
    expected = ((bypass.usage.prompt_tokens - cached) * 0.15 + cached * 0.075
                + bypass.usage.completion_tokens * 0.6) / 1e6
    assert missed["openai_cost_usd"] == pytest.approx(expected)
    assert missed["proxy_cost_usd"] is None and missed["difference_usd"] == pytest.approx(expected, abs=1e-9)
    # What went through the proxy: OpenAI's bill and the proxy's costs agree.
    assert seen["openai_cost_usd"] == pytest.approx(seen["proxy_cost_usd"], abs=1e-9)
    assert seen["proxy_cost_usd"] > 0 and seen["difference_usd"] == pytest.approx(0, abs=1e-9)
    assert seen["proxy_unpriced_requests"] == 0

    conn = sqlite3.connect(proxy.db)
    stored = conn.execute("select model, requests, input_tokens, output_tokens from openai_usage "
                          "where bucket_width = '1d' and model != '' order by model").fetchall()
    assert stored == [("gpt-4o-2024-08-06", 3, seen["openai_input_tokens"], seen["openai_output_tokens"]),
                      ("gpt-4o-mini-2024-07-18", 1, bypass.usage.prompt_tokens, bypass.usage.completion_tokens)]
    items = {r[0] for r in conn.execute("select line_item from openai_costs")}
    assert items == {f"{m}, {k}" for m in ("gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18") for k in ("input", "output")}

    # The human-readable table says the same.
    table = run(proxy.db, f"http://127.0.0.1:{admin_api.port}/v1")
    assert table.returncode == 0
    assert "gpt-4o-mini-2024-07-18" in table.stdout
    assert f"+{bypass.usage.total_tokens:,}" in table.stdout
    assert "were not seen by the proxy" in table.stdout
    assert f"+{expected:,.6f}" in table.stdout and "OpenAI's costs differ from the proxy's" in table.stdout


def test_pagination_and_hourly_buckets(admin_api, tmp_path):
    db = tmp_path / "usage.db"
    base = f"http://127.0.0.1:{admin_api.port}/v1"
    direct = openai.OpenAI(api_key="sk-direct-0123456789abcdef", base_url=base)
    direct.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    # 40 daily buckets at 31 per page: two pages.
    assert run(db, base, "--days", "40", "--json").returncode == 0
    pages = [c.path for c in admin_api.state.calls("/organization/usage/completions")]
    assert len(pages) == 2 and "page=" not in pages[0] and "page=page_31" in pages[1]
    assert "group_by=model" in pages[0] and "bucket_width=1d" in pages[0]
    hourly = json.loads(run(db, base, "--bucket", "1h", "--days", "1", "--json").stdout)
    (row,) = hourly["rows"]
    assert row["model"] == "gpt-5-2025-08-07" and row["openai_requests"] == 1
    conn = sqlite3.connect(db)
    hours = conn.execute("select count(*) from openai_usage where bucket_width = '1h' and model != ''").fetchone()
    assert hours == (1,)
    # Running again replaces the buckets instead of adding them up.
    run(db, base, "--bucket", "1h", "--days", "1", "--json")
    assert conn.execute("select sum(requests) from openai_usage where bucket_width = '1h'").fetchone() == (1,)


def test_alerts_fire_on_openai_figures_once(admin_api, tmp_path):
    db, config = tmp_path / "usage.db", tmp_path / "config.toml"
    config.write_text(CONFIG)
    base = f"http://127.0.0.1:{admin_api.port}/v1"
    direct = openai.OpenAI(api_key="sk-direct-0123456789abcdef", base_url=base)
    for _ in range(3):
        direct.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "y" * 400}])
    used = sum(c.usage_sent["total_tokens"] for c in admin_api.state.calls("/chat/completions"))
    assert used >= 300
    for _ in range(2):
        result = run(db, base, "--alerts", "--json", config=config)
        assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(db)
    alerts = conn.execute('select pool, threshold, used, "limit", message from alerts order by threshold').fetchall()
    assert [(a[0], a[1], a[2], a[3]) for a in alerts] == [("premium", 80.0, used, 300), ("premium", 100.0, used, 300)]
    assert "premium" in alerts[0][4]


def test_errors_are_clear(admin_api, tmp_path):
    base = f"http://127.0.0.1:{admin_api.port}/v1"
    denied = run(tmp_path / "u.db", base, key="sk-proj-notAdmin")
    assert denied.returncode == 1
    assert "HTTP 401" in denied.stderr and "admin key" in denied.stderr
    missing = subprocess.run([sys.executable, "-m", "addon", "reconcile", "--db", str(tmp_path / "u.db")], cwd=ROOT,
                             capture_output=True, text=True, env={"PATH": "/usr/bin"}, timeout=30)
    assert missing.returncode == 2 and "OPENAI_ADMIN_KEY" in missing.stderr
    unreachable = run(tmp_path / "u.db", "http://127.0.0.1:9/v1")
    assert unreachable.returncode == 1 and "error: GET /organization/usage/completions" in unreachable.stderr


def test_every_keeps_polling(admin_api, tmp_path):
    base = f"http://127.0.0.1:{admin_api.port}/v1"
    proc = subprocess.Popen([sys.executable, "-m", "addon", "reconcile", "--db", str(tmp_path / "u.db"), "--base-url",
                             base, "--admin-key", ADMIN, "--every", "0.2s"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(admin_api.state.calls("/organization/costs")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(admin_api.state.calls("/organization/costs")) >= 3
    finally:
        proc.terminate()
        proc.wait(10)


def test_duration_parsing():
    assert reconcile.parse_duration("5m") == 300
    assert reconcile.parse_duration("90") == 90
    assert reconcile.parse_duration("1.5h") == 5400
    with pytest.raises(ValueError):
        reconcile.parse_duration("soon")
