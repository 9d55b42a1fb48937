"""The dashboard in headless Chromium: loads without JavaScript errors and draws every chart.

Chromium is driven over the DevTools protocol with a small synchronous
client (wsproto, which mitmproxy already depends on). A screenshot is kept in
tests/artifacts/dashboard.png. Skipped when Debian's `chromium` is absent.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from test_datasette import CONFIG, OTHER_KEY, traffic
from test_datasette_helpers import Datasette, metadata, publish_pools
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from addon import config as config_mod

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--remote-debugging-port=0", "--remote-allow-origins=*"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


class DevTools:
    """Just enough of the Chrome DevTools protocol: calls, and the events that arrive meanwhile."""

    def __init__(self, ws_url: str) -> None:
        url = urlsplit(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=30)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=url.netloc, target=url.path)))
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        self._text = ""
        self._pending: list[dict] = []
        while not any(isinstance(e, AcceptConnection) for e in self._read()):
            pass

    def _read(self) -> list:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("DevTools connection closed")
        self.ws.receive_data(data)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise ConnectionError("DevTools connection closed")
            elif isinstance(event, TextMessage):
                self._text += event.data
                if event.message_finished:
                    self._pending.append(json.loads(self._text))
                    self._text = ""
        return events

    def _messages(self) -> list[dict]:
        self._read()
        messages, self._pending = self._pending, []
        return messages

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        ident = next(self.ids)
        self.sock.sendall(self.ws.send(TextMessage(json.dumps({"id": ident, "method": method, "params": params}))))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self._messages():
                if message.get("id") == ident:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})
                if "method" in message:
                    self.events.append(message)
        raise TimeoutError(method)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if event["method"] == method:
                    return event
            seen = len(self.events)
            for message in self._messages():
                if "method" in message:
                    self.events.append(message)
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"chromium did not start: {(tmp_path / 'chromium.log').read_text(errors='replace')}")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
    devtools = DevTools(pages[0]["webSocketDebuggerUrl"])
    yield devtools
    devtools.close()
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def errors_in(events: list[dict]) -> list[str]:
    found = []
    for event in events:
        params = event.get("params", {})
        if event["method"] == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append(details.get("exception", {}).get("description") or details.get("text"))
        elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
    return found


CHARTS_DRAWN = """
(() => {
  const cards = [...document.querySelectorAll('.dashboard-card-chart')];
  return cards.map(el => ({
    id: el.id,
    drawn: !!el.querySelector('canvas, svg, table, p'),
  }));
})()
"""


def test_dashboard_draws_every_chart_without_errors(browser, make_proxy, tmp_path):
    config_path = tmp_path / "config.toml"
    # Small limits, so that the pool gauges show something after a few calls.
    # (estimate_output_tokens: admission reserves little, so that these calls fit.)
    # alice gets limits of her own, for the key-limits panel.
    config_path.write_text("estimate_output_tokens = 8\n" + CONFIG.replace("1_000_000", "1_000")
                           .replace("5_000_000", "2_500").replace('label = "alice"', 'label = "alice"\n'
                                                                  'limits = { premium = 600, mini = 1_500 }'))
    proxy = make_proxy(options={"usage_config": str(config_path)})
    count = traffic(proxy)
    # A little more, so the screenshot shows something: a second key, more models, a refusal.
    alice = proxy.client(api_key=OTHER_KEY, max_retries=0)
    for model in ("gpt-4o", "gpt-5", "gpt-4o-mini", "gpt-4o-mini"):
        alice.chat.completions.create(model=model, messages=[{"role": "user", "content": "tell me more " * 40}])
        count += 1
    with pytest.raises(openai.APIStatusError):
        alice.chat.completions.create(model="gpt-4.1-nano", messages=[{"role": "user", "content": "again"}],
                                      extra_headers={"x-fake-status": "429"})
    count += 1
    proxy.wait_rows(count)
    publish_pools(proxy.db, config_mod.load(config_path))
    ds = Datasette(proxy.db, tmp_path / "datasette.log")
    try:
        browser.call("Runtime.enable")
        browser.call("Log.enable")
        browser.call("Page.enable")
        browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1150, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=f"{ds.url}/-/dashboards/usage")
        browser.wait_event("Page.loadEventFired")
        expected = set(metadata()["plugins"]["datasette-dashboards"]["usage"]["charts"])
        deadline = time.monotonic() + 20
        while True:
            charts = browser.evaluate(CHARTS_DRAWN)
            if charts and all(c["drawn"] for c in charts) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {c["id"].removeprefix("chart-") for c in charts} == expected
        assert [c["id"] for c in charts if not c["drawn"]] == []
        # The whole page in one picture; Vega finishes drawing asynchronously, let it settle.
        height = browser.evaluate("document.documentElement.scrollHeight")
        browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=height, deviceScaleFactor=1, mobile=False)
        time.sleep(1.0)
        shot = browser.call("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
        # The dashboard shows the figures of the database.
        text = browser.evaluate("document.querySelector('#chart-requests-today').innerText")
        assert text.strip() == str(len(proxy.rows()))
        assert errors_in(browser.events) == []
        assert "Traceback" not in ds.log()
        # It reloads itself every 10 s (datasette-dashboards counts in minutes).
        html = browser.evaluate("document.documentElement.outerHTML")
        assert "autorefresh(0.1666" in html
    finally:
        ds.stop()


def test_dashboard_date_filter(browser, make_proxy, tmp_path):
    """The time range filter goes into the charts' queries: a range in the past shows no blocked request."""
    config_path = tmp_path / "config.toml"
    config_path.write_text(CONFIG)
    proxy = make_proxy(options={"usage_config": str(config_path)})
    with pytest.raises(openai.APIStatusError):
        proxy.client(max_retries=0).chat.completions.create(
            model="gpt-4.1-nano", messages=[{"role": "user", "content": "x"}], extra_headers={"x-fake-status": "429"})
    (row,) = proxy.wait_rows(1)
    assert row["outcome"] == "blocked"
    publish_pools(proxy.db, config_mod.load(config_path))
    ds = Datasette(proxy.db, tmp_path / "datasette.log")
    try:
        browser.call("Runtime.enable")
        browser.call("Log.enable")
        browser.call("Page.enable")
        past = "?date_from=2001-01-01&date_to=2001-01-31"
        for query, expected in (("", "gpt-4.1-nano"), (past, "none in this range")):
            browser.call("Page.navigate", url=f"{ds.url}/-/dashboards/usage{query}")
            browser.wait_event("Page.loadEventFired")
            text = ""
            deadline = time.monotonic() + 20
            while not text and time.monotonic() < deadline:
                text = browser.evaluate("document.querySelector('#chart-recent-blocked').innerText")
                time.sleep(0.1)
            assert expected in text
        assert browser.evaluate("document.querySelector('#date_from').value") == "2001-01-01"
        assert errors_in(browser.events) == []
    finally:
        ds.stop()
