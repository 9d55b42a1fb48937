"""The proxy's addons, built and ordered in one place, the order checked.

mitmproxy calls each hook on the addons in list order; some addons rely on
another having run before them in the same hook. `build()` makes the list
`addon/usage.py` hands to mitmproxy; `check_order()` refuses any list that
breaks one of the rules below.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

# The modules that define mitmproxy's hooks (each definition fills hooks.all_hooks, which Chain reads):
# imported here so that a Chain built before mitmproxy loaded them (a test, a library user) misses none.
import mitmproxy.addonmanager  # noqa: F401
import mitmproxy.log  # noqa: F401
import mitmproxy.proxy.layers  # noqa: F401
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import hooks

from addon.proxy.bodylog import BodyLog
from addon.proxy.exposure import ExposureWarning
from addon.proxy.intercept import InterceptOnlyMetered
from addon.proxy.issued_keys import IssuedKeys
from addon.proxy.limits import Limits
from addon.proxy.meter import UsageMeter
from addon.proxy.pricing import Pricing
from addon.proxy.redis_rows import RedisRows
from addon.proxy.websocket import WebSocketMeter

# (earlier, later, why): in every hook, `earlier` runs before `later`.
ORDER: list[tuple[type, type, str]] = [
    (IssuedKeys, UsageMeter, "it sets the identity the meter records, and refuses before the meter classifies"),
    (WebSocketMeter, UsageMeter, "its done() records responses in flight before the meter closes the writer"),
    (UsageMeter, Limits, "the meter's request hook classifies the call that Limits admits"),
    (UsageMeter, Pricing, "Pricing prices rows with the config the meter has just loaded"),
    (UsageMeter, RedisRows, "its done() publishes the rows that the meter's writer commits as it closes"),
]


def check_order(addons: list[object]) -> None:
    """Raise ValueError when an addon that another relies on comes after it (or is missing)."""
    position = {type(a): i for i, a in enumerate(addons)}
    for earlier, later, why in ORDER:
        if later in position and position.get(earlier, len(addons)) > position[later]:
            raise ValueError(f"addon order: {earlier.__name__} must come before {later.__name__}: {why}")


def build() -> list[object]:
    meter = UsageMeter()
    limits = Limits(meter)
    issued = IssuedKeys(meter)
    # InterceptOnlyMetered decides at the TLS handshake, before any request.
    addons: list[object] = [InterceptOnlyMetered(meter), issued, WebSocketMeter(meter, limits), meter,
                            Pricing(meter), limits, BodyLog(meter), ExposureWarning(issued), RedisRows()]
    check_order(addons)
    return addons


# Lifecycle hooks that mitmproxy calls synchronously (AddonManager.trigger / invoke_addon_sync).
_SYNC_HOOKS = ("load", "configure", "running", "done")


class Chain:
    """The addons of `build()` as one mitmproxy addon, which calls each hook on them in list order.

    mitmproxy offers every event (a dozen per flow: connections, TLS, HTTP) to
    every addon it knows, walking the addon tree and looking each hook up by
    name; nine addons of our own made that walk cost as much as some of their
    hooks. Here the lookup is done once: an event none of them handles costs
    one failed attribute lookup, a hook only one of them has is its bound
    method itself. Commands (`usage.reset`) are registered in `load`.
    As in mitmproxy, a hook that returns an awaitable is awaited before the
    next addon's hook runs, and an exception stops the event for the later ones.
    """

    name = "usage"  # mitmproxy's name of the addon

    def __init__(self, addons: list[object]) -> None:
        check_order(addons)
        for addon in addons:
            for event in _SYNC_HOOKS:
                if inspect.iscoroutinefunction(getattr(addon, event, None)):
                    # mitmproxy calls these without awaiting: the coroutine would be dropped, and the later
                    # members skipped, without a word (mitmproxy itself refuses such an addon).
                    raise ValueError(f"{type(addon).__name__}.{event} must not be async")
        self.members = addons
        for event in hooks.all_hooks:
            found = [getattr(a, event) for a in addons if callable(getattr(a, event, None))]
            if event == "load":
                found.append(self._load_commands)
            if len(found) == 1:
                setattr(self, event, found[0])
            elif found:
                setattr(self, event, _in_order(found))

    def _load_commands(self, loader) -> None:
        # What mitmproxy does for the addons it walks itself (the members are not in its tree).
        for addon in self.members:
            loader.master.commands.collect_commands(addon)


def _in_order(calls: list[Callable[..., Any]]) -> Callable[..., Any]:
    def hook(*args: Any) -> Awaitable[None] | None:
        for i, call in enumerate(calls):
            result = call(*args)
            if result is not None and inspect.isawaitable(result):
                return _rest(result, calls[i + 1 :], args)
        return None

    return hook


async def _rest(pending: Awaitable[Any], calls: list[Callable[..., Any]], args: tuple[Any, ...]) -> None:
    await pending
    for call in calls:
        result = call(*args)
        if result is not None and inspect.isawaitable(result):
            await result
