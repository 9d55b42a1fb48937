"""Fixtures: the fake OpenAI server, real mitmdump processes, SDK clients."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_openai import FakeServer  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MITMDUMP = str(VENV_BIN / "mitmdump")
FAKE_KEY = "sk-proj-test0123456789abcdefWXYZ"


@pytest.fixture(autouse=True)
def _no_calls_handed_over_between_tests() -> Iterator[None]:
    # A meter whose done() runs without mitmproxy shutting down (as in-process tests do) takes it for a script
    # reload and hands its open calls to the next meter, through the module: not to the next test's.
    yield
    meter = sys.modules.get("addon.proxy.meter")
    if meter is not None:
        meter._HANDOVER.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer(tls=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def confdir(tmp_path_factory) -> Path:
    """One mitmproxy confdir (and CA) for the whole session."""
    return tmp_path_factory.mktemp("mitmconf")


class Proxy:
    """A real `mitmdump -s addon/usage.py` process."""

    def __init__(self, port: int, db: Path, proc: subprocess.Popen, log: Path, confdir: Path, mode: str) -> None:
        self.port = port
        self.db = db
        self.proc = proc
        self.log_path = log
        self.confdir = confdir
        self.mode = mode

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def client(self, **kwargs):
        """An `openai.OpenAI` client that goes through this proxy."""
        import openai

        kwargs.setdefault("api_key", FAKE_KEY)
        if self.mode == "regular":
            http_client = openai.DefaultHttpxClient(proxy=self.url, verify=self.ca)
            return openai.OpenAI(http_client=http_client, **kwargs)
        return openai.OpenAI(base_url=f"{self.url}/v1", **kwargs)

    def async_client(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", FAKE_KEY)
        if self.mode == "regular":
            http_client = openai.DefaultAsyncHttpxClient(proxy=self.url, verify=self.ca)
            return openai.AsyncOpenAI(http_client=http_client, **kwargs)
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", **kwargs)

    def rows(self, where: str = "1", params: tuple = ()) -> list[dict]:
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"select * from requests where {where} order by id", params)]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def wait_rows(self, count: int, where: str = "1", params: tuple = (), timeout: float = 10) -> list[dict]:
        """Rows are written by a thread a few ms after the response: wait for them."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(where, params)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


def start_proxy(
    tmp_path: Path,
    confdir: Path,
    fake_port: int | None,
    *,
    mode: str = "regular",
    options: dict[str, str] | None = None,
    addon: bool = True,
    db: Path | None = None,
    extra_env: dict[str, str] | None = None,
    script: Path | None = None,
) -> Proxy:
    port = free_port()
    db = db or tmp_path / "usage.db"
    log = tmp_path / f"mitmdump-{port}.log"
    args = [MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", str(port), "--set", f"confdir={confdir}",
            "--set", "ssl_insecure=true", "--set", "termlog_verbosity=info", "--set", "flow_detail=0"]
    if mode == "reverse":
        args += ["--mode", "reverse:https://api.openai.com"]
    args += ["-s", str(ROOT / "tests" / "route.py")]
    if addon:
        args += ["-s", str(script or ROOT / "addon" / "usage.py"), "--set", f"usage_db={db}"]
    for name, value in (options or {}).items():
        args += ["--set", f"{name}={value}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    if fake_port is not None:
        env["FAKE_OPENAI_ADDR"] = f"127.0.0.1:{fake_port}"
    handle = open(log, "wb")
    proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_port(port, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"mitmdump did not start:\n{log.read_text(errors='replace')}") from None
    return Proxy(port, db, proc, log, confdir, mode)


@pytest.fixture
def make_proxy(tmp_path, confdir, fake_server):
    started: list[Proxy] = []

    def factory(**kwargs) -> Proxy:
        proxy = start_proxy(tmp_path, confdir, fake_server.port, **kwargs)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()


@pytest.fixture(params=["regular", "reverse"])
def proxy(request, make_proxy) -> Proxy:
    """The proxy in regular (HTTPS_PROXY) and reverse (OPENAI_BASE_URL) mode."""
    return make_proxy(mode=request.param)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a loopback port (skipped, with the reason, where Debian's is not installed)."""
    from redis_server import RedisServer, require_redis

    require_redis()
    server = RedisServer(free_port(), tmp_path / "redis").start()
    yield server
    server.stop()
