"""The Limits addon drives either ledger through one interface (addon/ledger/backend.py): in process, with
mitmproxy's taddons, a real SQLite file and a real redis-server."""

from __future__ import annotations

import asyncio
import json

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addon.ledger.redis_ledger import RedisLedger
from addon.ledger.sqlite_ledger import Ledger
from addon.proxy.limits import Limits
from addon.proxy.meter import UsageMeter
from addon.proxy.redis_rows import RedisRows

CONFIG = """
[pools.premium]
limit = 100000
models = ["gpt-4o*"]
"""
KEY = "sk-proj-backendtest0123456789ab"


def upgrade_flow() -> http.HTTPFlow:
    """A Realtime WebSocket upgrade: admitted while the pool has tokens left, it reserves nothing."""
    request = tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"GET",
                          path=b"/v1/realtime?model=gpt-4o-realtime-preview",
                          headers=http.Headers(((b"authorization", f"Bearer {KEY}".encode()),
                                                (b"connection", b"Upgrade"), (b"upgrade", b"websocket"))),
                          content=b"")
    return tflow.tflow(req=request)


def chat_flow() -> http.HTTPFlow:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    request = tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST",
                          path=b"/v1/chat/completions",
                          headers=http.Headers(((b"content-type", b"application/json"),
                                                (b"authorization", f"Bearer {KEY}".encode()))),
                          content=json.dumps(body).encode())
    return tflow.tflow(req=request)


async def admit(limits: Limits, meter: UsageMeter, flow: http.HTTPFlow) -> None:
    assert meter.request(flow) is None
    pending = limits.request(flow)
    if pending is not None:
        await pending
    assert flow.response is None  # admitted


def run_limits(tmp_path, options: dict, body) -> None:
    (tmp_path / "c.toml").write_text(CONFIG)

    async def main() -> None:
        meter = UsageMeter()
        limits = Limits(meter)
        rows = RedisRows()  # declares usage_redis
        with taddons.context(rows, meter, limits) as tctx:
            tctx.configure(meter, usage_db=str(tmp_path / "usage.db"), usage_config=str(tmp_path / "c.toml"),
                           **options)
            try:
                await body(meter, limits)
            finally:
                limits.done()
                meter.done()
                rows.done()

    asyncio.run(main())


def test_the_sqlite_ledger_backs_limits_without_redis(tmp_path):
    async def body(meter, limits):
        assert isinstance(limits.ledger, Ledger)
        await admit(limits, meter, chat_flow())

    run_limits(tmp_path, {}, body)


def test_a_redis_websocket_upgrade_keeps_no_reservation(tmp_path, redis_server):
    """A Redis admission has no reservation id: the upgrade gives it back by its owner, at once (it used to stay
    reserved, kept alive by the heartbeat, until the proxy stopped)."""
    client = redis_server.client()

    def reserved() -> dict:
        return {k: client.hgetall(k) for k in client.keys("usage:rsv:*") if client.hlen(k)}

    async def body(meter, limits):
        ledger = limits.ledger
        assert isinstance(ledger, RedisLedger)
        await admit(limits, meter, chat_flow())
        assert ledger.flush()
        held = reserved()
        assert held and all(len(v) == 1 for v in held.values())  # the chat call's estimate, in flight
        await admit(limits, meter, upgrade_flow())
        assert ledger.flush()
        assert reserved() == held  # the upgrade's token went back

    run_limits(tmp_path, {"usage_redis": redis_server.url}, body)
