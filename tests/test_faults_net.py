"""Upstream and client faults: the client gets what upstream did, one row per exchange.

Every case runs through a real mitmdump with the addon, against the fake
OpenAI server misbehaving on request (x-fake-behavior), and checks: exactly
one row with the right outcome, and no traceback in the mitmproxy log.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from conftest import FAKE_KEY

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def rproxy(tmp_path_factory, confdir, fake_server):
    """One reverse proxy for the module (plain HTTP on the client side, no CA)."""
    from conftest import start_proxy

    tmp = tmp_path_factory.mktemp("net")
    proxy = start_proxy(tmp, confdir, fake_server.port, mode="reverse")
    yield proxy
    proxy.stop()
    assert "Traceback" not in proxy.log(), proxy.log()


def _post(proxy, headers: dict[str, str], body: dict | None = None, timeout: float = 10) -> httpx.Response | Exception:
    try:
        return httpx.post(f"{proxy.url}{CHAT}", json=body or BODY, timeout=timeout,
                          headers={"authorization": f"Bearer {FAKE_KEY}", **headers})
    except httpx.HTTPError as exc:
        return exc


def _one_row(proxy, marker: str) -> dict:
    """The single row of the exchange tagged with user agent `marker`."""
    rows = proxy.wait_rows(1, "user_agent = ?", (marker,))
    time.sleep(0.3)  # a second row would come right after the first
    rows = proxy.rows("user_agent = ?", (marker,))
    assert len(rows) == 1, rows
    assert "Traceback" not in proxy.log()
    return rows[0]


@pytest.mark.parametrize(
    ("behavior", "stream", "outcome", "status"),
    [
        ("reset-mid-stream", True, "aborted", 200),
        ("truncate-stream", True, "aborted", 200),
        ("non-json", False, "no_usage", 200),
        ("short-body", False, "error", 502),
    ],
)
def test_upstream_misbehaves(rproxy, behavior, stream, outcome, status):
    marker = f"fault-{behavior}"
    result = _post(rproxy, {"x-fake-behavior": behavior, "user-agent": marker}, {**BODY, "stream": stream})
    row = _one_row(rproxy, marker)
    assert row["outcome"] == outcome, row
    if outcome != "ok":
        assert row["error"], row
    if isinstance(result, httpx.Response):
        assert row["status"] == result.status_code
    else:
        assert row["status"] in (status, None)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx(rproxy, status):
    marker = f"fault-{status}"
    result = _post(rproxy, {"x-fake-status": str(status), "user-agent": marker})
    assert isinstance(result, httpx.Response) and result.status_code == status
    row = _one_row(rproxy, marker)
    assert (row["outcome"], row["status"]) == ("error", status)
    assert "fake error" in row["error"]


def test_upstream_5xx_not_json(rproxy):
    marker = "fault-500-html"
    result = _post(rproxy, {"x-fake-status": "500", "x-fake-behavior": "non-json", "user-agent": marker})
    assert isinstance(result, httpx.Response) and result.status_code == 500
    assert result.text == "<html>upstream oops</html>"  # passed through untouched
    row = _one_row(rproxy, marker)
    assert (row["outcome"], row["status"]) == ("error", 500)


def test_upstream_stalls_past_client_timeout(rproxy):
    """Upstream goes quiet mid-stream; the client's timeout gives up: aborted."""
    marker = "fault-stall"
    client = openai.OpenAI(base_url=f"{rproxy.url}/v1", api_key=FAKE_KEY, timeout=1.0, max_retries=0)
    with pytest.raises(openai.APITimeoutError):
        stream = client.chat.completions.create(
            **BODY, stream=True, extra_headers={"x-fake-behavior": "stall", "x-fake-stall": "3", "user-agent": marker}
        )
        for _ in stream:
            pass
    row = _one_row(rproxy, marker)
    assert row["outcome"] == "aborted"
    assert row["streamed"] == 1


def test_client_disconnects_mid_stream(rproxy):
    marker = "fault-client-mid-stream"
    client = openai.OpenAI(base_url=f"{rproxy.url}/v1", api_key=FAKE_KEY, max_retries=0)
    stream = client.chat.completions.create(
        **BODY, stream=True, extra_headers={"x-fake-delay": "0.3", "x-fake-chunks": "10", "user-agent": marker}
    )
    first = next(iter(stream))
    assert first.choices
    stream.close()
    row = _one_row(rproxy, marker)
    assert row["outcome"] == "aborted"
    assert row["input_tokens"] is None  # usage never arrived


def test_client_disconnects_while_waiting(rproxy):
    """The client sends its request, then hangs up before the answer."""
    marker = "fault-client-waiting"
    client = openai.OpenAI(base_url=f"{rproxy.url}/v1", api_key=FAKE_KEY, timeout=0.5, max_retries=0)
    with pytest.raises(openai.APITimeoutError):
        # The first event comes after the stall: the client is gone before any byte.
        client.chat.completions.create(
            **BODY, stream=True,
            extra_headers={"x-fake-behavior": "stall-headers", "x-fake-stall": "2", "user-agent": marker},
        )
    row = _one_row(rproxy, marker)
    assert row["outcome"] == "aborted"


def test_client_disconnects_during_request_body(rproxy):
    """Headers and half the body, then the client is gone: nothing goes upstream, one aborted row."""
    marker = "fault-client-half-body"
    body = json.dumps(BODY).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {FAKE_KEY}\r\nuser-agent: {marker}\r\ncontent-length: {len(body) + 500}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", rproxy.port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.3)
    row = _one_row(rproxy, marker)
    assert row["outcome"] == "aborted"
    assert row["status"] is None


def test_no_key_in_error_rows(rproxy):
    """Error messages carry no credential (the last 4 characters, as key_hint, at most)."""
    rows = rproxy.rows("error is not null")
    assert rows
    for row in rows:
        assert FAKE_KEY not in json.dumps(row)
        assert FAKE_KEY[:-4] not in row["error"]
