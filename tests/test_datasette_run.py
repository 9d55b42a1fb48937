"""`python -m addon run`: proxy and Datasette together, one Ctrl-C stops both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
from conftest import FAKE_KEY, ROOT, free_port, wait_port


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_run_starts_both_and_ctrl_c_stops_both(tmp_path, confdir, fake_server):
    import openai

    db = tmp_path / "usage.db"
    proxy_port, ui_port = free_port(), free_port()
    out = tmp_path / "run.log"
    env = {**os.environ, "FAKE_OPENAI_ADDR": f"127.0.0.1:{fake_server.port}", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "addon", "run", "--db", str(db), "--proxy-port", str(proxy_port),
           "--datasette-port", str(ui_port), "--",
           "-s", str(ROOT / "tests" / "route.py"), "--set", f"confdir={confdir}", "--set", "ssl_insecure=true"]
    with open(out, "wb") as handle:
        # A session of its own: the Ctrl-C below goes to the whole group, as a terminal's would.
        runner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_port(proxy_port, timeout=30, proc=runner)
        wait_port(ui_port, timeout=30, proc=runner)
        # Tables (and pools) exist before any traffic.
        status = _get_json(f"http://127.0.0.1:{ui_port}/usage/status.json?_shape=array")
        assert {s["pool"] for s in status} >= {"premium", "mini"}
        children = psutil.Process(runner.pid).children()
        assert len(children) == 2

        client = openai.OpenAI(api_key=FAKE_KEY, http_client=openai.DefaultHttpxClient(
            proxy=f"http://127.0.0.1:{proxy_port}", verify=str(confdir / "mitmproxy-ca-cert.pem")))
        answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = {s["pool"]: s for s in _get_json(f"http://127.0.0.1:{ui_port}/usage/status.json?_shape=array")}
            if status["premium"]["used"]:
                break
            time.sleep(0.1)
        assert status["premium"]["used"] == answer.usage.total_tokens

        text = out.read_text()
        assert f"HTTPS_PROXY=http://127.0.0.1:{proxy_port}" in text
        assert str(confdir / "mitmproxy-ca-cert.pem") in text
        assert "OPENAI_BASE_URL=" in text and "reverse" in text
        assert f"http://127.0.0.1:{ui_port}/-/dashboards/usage" in text

        os.killpg(runner.pid, signal.SIGINT)
        assert runner.wait(30) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()


def test_run_stops_both_on_sigterm(tmp_path):
    proxy_port, ui_port = free_port(), free_port()
    runner = subprocess.Popen([sys.executable, "-m", "addon", "run", "--db", str(tmp_path / "usage.db"),
                               "--proxy-port", str(proxy_port), "--datasette-port", str(ui_port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(proxy_port, timeout=30, proc=runner)
        wait_port(ui_port, timeout=30, proc=runner)
        children = psutil.Process(runner.pid).children()
        runner.terminate()  # only the runner gets it, not its children
        assert runner.wait(30) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_run_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pools.x]\nlimit = -1\n")
    result = subprocess.run([sys.executable, "-m", "addon", "run", "--db", str(tmp_path / "usage.db"),
                             "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert str(bad) in result.stderr and "limit" in result.stderr


def test_run_renames_the_database_in_the_metadata(tmp_path):
    from addon.tools.run import metadata_for

    path = metadata_for(tmp_path / "team.db", tmp_path)
    data = json.loads(path.read_text())
    assert list(data["databases"]) == ["team"]
    charts = data["plugins"]["datasette-dashboards"]["usage"]["charts"]
    assert {c.get("db") for c in charts.values()} == {"team"}
