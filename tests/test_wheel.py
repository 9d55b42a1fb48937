"""The package as users install it: a wheel built from this checkout, in a fresh venv, run from an empty directory.

Nothing of the checkout may be needed at run time: `openai-usage-meter run` must serve the dashboard and the JSON
API (`/usage/status.json`) from what the wheel holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port, wait_port

pytestmark = pytest.mark.wheel


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def test_wheel_in_a_fresh_venv_runs_proxy_and_datasette(tmp_path, confdir):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=120)
    [wheel] = wheels.glob("openai_usage_meter-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    bin_dir = venv / "bin"
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "-r", str(ROOT / "requirements.lock"),
                    str(wheel)], check=True, capture_output=True, timeout=300)

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    where = subprocess.run([str(bin_dir / "python"), "-c", "import addon; print(addon.__file__)"], cwd=empty,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed package, not this checkout

    proxy_port, ui_port = free_port(), free_port()
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        runner = subprocess.Popen(
            [str(bin_dir / "openai-usage-meter"), "run", "--proxy-port", str(proxy_port), "--datasette-port",
             str(ui_port), "--", "--set", f"confdir={confdir}"],
            cwd=empty, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(proxy_port, timeout=60, proc=runner)
        wait_port(ui_port, timeout=60, proc=runner)
        status, body = _get(f"http://127.0.0.1:{ui_port}/usage/status.json?_shape=array")
        assert status == 200
        pools = {row["pool"]: row for row in json.loads(body)}
        assert {"premium", "mini"} <= set(pools), pools  # the bundled config's pools, published before traffic
        assert pools["premium"]["used"] == 0 and pools["premium"]["limit"] > 0
        status, page = _get(f"http://127.0.0.1:{ui_port}/-/dashboards/usage")
        assert status == 200 and b"usage" in page
        assert (empty / "usage.db").exists()
        os.killpg(runner.pid, signal.SIGINT)
        assert runner.wait(30) == 0, log.read_text()
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
