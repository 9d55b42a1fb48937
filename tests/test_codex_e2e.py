"""Codex CLI (`codex exec`) through the proxy against the fake server: Responses WebSocket
mode and its HTTP fallback, regular (HTTPS_PROXY + CODEX_CA_CERTIFICATE) and reverse mode.

Codex comes from npm (`@openai/codex`, pinned in the Makefile) into .tools/; without it these
tests are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAKE_KEY, ROOT

CODEX = ROOT / ".tools" / "node_modules" / ".bin" / "codex"

pytestmark = pytest.mark.skipif(
    not CODEX.exists(), reason=f"Codex CLI not installed at {CODEX} (make codex: npm install @openai/codex failed)"
)

TIGHT_CONFIG = """
timezone = "UTC"
default_pool = "premium"

[pools.premium]
limit = {limit}
window = "day"
models = ["gpt-5*"]
"""


def run_codex(proxy, tmp_path: Path, prompt: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    home = tmp_path / f"codex-home-{proxy.port}"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update({"CODEX_HOME": str(home), "OPENAI_API_KEY": FAKE_KEY, "NO_COLOR": "1", "RUST_LOG": "warn"})
    args = [str(CODEX), "exec", "--skip-git-repo-check", "-m", "gpt-5", "-c", "model_reasoning_effort=low"]
    if proxy.mode == "regular":
        env["HTTPS_PROXY"] = proxy.url
        env["CODEX_CA_CERTIFICATE"] = proxy.ca
    else:
        args += ["-c", f'openai_base_url="{proxy.url}/v1"']
    login = subprocess.run([str(CODEX), "login", "--with-api-key"], input=FAKE_KEY, text=True, env=env,
                           capture_output=True, timeout=60, cwd=tmp_path)
    assert login.returncode == 0, login.stderr
    started = time.monotonic()
    result = subprocess.run(args + [prompt], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return result, time.monotonic() - started


def _upstream(fake_server) -> tuple[int, list[dict]]:
    """(response.create messages plus HTTP POSTs that reached the fake, the usage it served)."""
    calls = fake_server.state.calls("/v1/responses")
    creates = sum(1 for r in calls for m in r.ws_messages if isinstance(m, dict) and m.get("type") == "response.create")
    posts = sum(1 for r in calls if r.method == "POST")
    return creates + posts, fake_server.state.usage_served("/v1/responses")


@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_codex_exec_rows_equal_served_usage(proxy, fake_server, tmp_path, transport):
    fake_server.state.clear()
    fake_server.state.websocket_refuse = transport == "http"
    try:
        result, _ = run_codex(proxy, tmp_path, "Say hello.")
    finally:
        fake_server.state.websocket_refuse = False
    assert result.returncode == 0, result.stdout + result.stderr
    sent, served = _upstream(fake_server)
    assert served, "Codex made no call the fake answered"
    rows = proxy.wait_rows(len(served), "total_tokens is not null")
    rows = [r for r in rows if r["endpoint"] == "responses"]
    assert len(rows) == len(served) == sent
    assert sum(r["total_tokens"] for r in rows) == sum(u["total_tokens"] for u in served)
    assert [r["input_tokens"] for r in rows] == [u["input_tokens"] for u in served]
    print(f"{proxy.mode}/{transport}: {len(rows)} rows, tokens recorded "
          f"{[(r['input_tokens'], r['output_tokens'], r['total_tokens']) for r in rows]}, "
          f"served {[(u['input_tokens'], u['output_tokens'], u['total_tokens']) for u in served]}")
    expected = "websocket" if transport == "websocket" else "sse"
    assert {r["transport"] for r in rows} == {expected}
    assert all(r["outcome"] == "ok" and r["user_agent"] and "codex" in r["user_agent"].lower() for r in rows)
    if transport == "http":
        upgrade = proxy.rows("status = 426")
        assert upgrade and upgrade[0]["outcome"] == "error"


@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_codex_refused_when_pool_spent(make_proxy, fake_server, tmp_path, transport):
    config = tmp_path / "tight.toml"
    config.write_text(TIGHT_CONFIG.format(limit=120))
    proxy = make_proxy(mode="reverse", options={"usage_config": str(config)})
    # Spend the pool (107 of 120 tokens) with one SDK call the proxy records.
    proxy.client().responses.create(model="gpt-5", input="x" * 400, max_output_tokens=1)
    assert proxy.wait_rows(1, "outcome = 'ok'")[0]["total_tokens"] == 107
    fake_server.state.clear()
    fake_server.state.websocket_refuse = transport == "http"
    try:
        result, elapsed = run_codex(proxy, tmp_path, "Say hello again.")
    finally:
        fake_server.state.websocket_refuse = False
    output = result.stdout + result.stderr
    print(f"codex exited {result.returncode} after {elapsed:.1f} s:\n" + output[-3000:])
    assert result.returncode != 0
    # Codex shows its own text for an `insufficient_quota` error (the contract's type), not the message.
    assert "Quota exceeded" in output
    assert elapsed < 30, f"Codex took {elapsed:.1f} s to give up"
    sent, served = _upstream(fake_server)
    assert sent == 0 and served == []
    blocked = proxy.wait_rows(1, "outcome = 'blocked' and endpoint = 'responses'")
    assert blocked and {r["transport"] for r in blocked} == {"websocket" if transport == "websocket" else "http"}
