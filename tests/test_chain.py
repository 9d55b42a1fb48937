"""addon/proxy/chain.Chain: the proxy's addons as one mitmproxy addon, hooks called as mitmproxy would."""

from __future__ import annotations

import asyncio

from mitmproxy.test import taddons, tflow

from addon.proxy import chain
from addon.proxy.limits import Limits
from addon.proxy.meter import UsageMeter


class _Recorder:
    def __init__(self, name: str, log: list[str], wait: bool = False) -> None:
        self.name, self.log, self.wait = name, log, wait

    def request(self, flow):
        self.log.append(self.name)
        if self.wait:
            return self._later()
        return None

    async def _later(self) -> None:
        await asyncio.sleep(0)
        self.log.append(self.name + " awaited")


class _Failing:
    def request(self, flow):
        raise RuntimeError("boom")


def test_hooks_run_in_list_order_and_an_awaitable_is_awaited_before_the_next_addon():
    log: list[str] = []
    first, second, third = _Recorder("a", log), _Recorder("b", log, wait=True), _Recorder("c", log)
    combined = chain.Chain([first, second, third])
    result = combined.request(tflow.tflow())
    assert log == ["a", "b"]  # the rest waits for b's coroutine
    asyncio.run(result)
    assert log == ["a", "b", "b awaited", "c"]


def test_a_hook_only_one_addon_has_is_that_addon_s_method_and_unhandled_events_are_absent():
    log: list[str] = []
    only = _Recorder("a", log)
    combined = chain.Chain([only])
    assert combined.request == only.request
    assert getattr(combined, "response", None) is None and getattr(combined, "websocket_message", None) is None


def test_an_exception_stops_the_event_for_the_later_addons_as_in_mitmproxy():
    log: list[str] = []
    combined = chain.Chain([_Recorder("a", log), _Failing(), _Recorder("c", log)])
    try:
        combined.request(tflow.tflow())
    except RuntimeError:
        pass
    else:
        raise AssertionError("the exception must reach mitmproxy (which logs it)")
    assert log == ["a"]


def test_the_chain_in_mitmproxy_registers_options_commands_and_configures_every_addon(tmp_path):
    addons = chain.build()
    combined = chain.Chain(addons)
    meter = next(a for a in addons if isinstance(a, UsageMeter))
    limits = next(a for a in addons if isinstance(a, Limits))
    with taddons.context(combined) as tctx:
        assert "usage_db" in tctx.options and "usage_hosts" in tctx.options
        assert "usage.reset" in tctx.master.commands.commands
        tctx.configure(combined, usage_db=str(tmp_path / "usage.db"))
        assert meter.writer is not None and str(meter.writer.path) == str(tmp_path / "usage.db")
        assert meter.prepare_rows is not None  # Pricing's configure ran after the meter's
        assert limits.ledger is not None
        combined.done()
    assert meter.stopped


def test_the_order_is_checked_for_the_chain_too():
    addons = chain.build()
    kinds = [type(a) for a in addons]
    swapped = list(addons)
    i, j = kinds.index(UsageMeter), kinds.index(Limits)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    try:
        chain.Chain(swapped)
    except ValueError as exc:
        assert "UsageMeter must come before Limits" in str(exc)
    else:
        raise AssertionError("a wrong order must be refused")


def test_a_chain_built_before_mitmproxy_loaded_its_layers_still_has_every_hook():
    # mitmproxy learns a hook's name when the module defining it is imported; a Chain built first
    # (a test, a library user) must not silently lack request/response/load and meter nothing.
    import subprocess
    import sys
    from pathlib import Path

    code = ("from addon.proxy.chain import Chain, build\n"
            "c = Chain(build())\n"
            "print(sorted(h for h in ('load', 'request', 'response', 'responseheaders', 'error', 'websocket_message',"
            " 'tls_clienthello') if callable(getattr(c, h, None))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == str(sorted(["load", "request", "response", "responseheaders", "error",
                                      "websocket_message", "tls_clienthello"]))


def test_an_async_lifecycle_hook_is_refused():
    # mitmproxy calls load/configure/running/done without awaiting them (at a script's load or reload):
    # a coroutine would be dropped, with the later members skipped, without a word.
    class AsyncDone:
        async def done(self) -> None:
            pass

    import pytest

    with pytest.raises(ValueError, match="AsyncDone.done must not be async"):
        chain.Chain([AsyncDone()])


def test_the_meter_closes_its_writer_before_the_redis_rows_publish_at_shutdown():
    import pytest

    from addon.proxy.redis_rows import RedisRows

    built = chain.build()
    redis_rows = next(a for a in built if isinstance(a, RedisRows))
    reordered = [redis_rows] + [a for a in built if a is not redis_rows]
    with pytest.raises(ValueError, match="UsageMeter must come before RedisRows"):
        chain.check_order(reordered)
