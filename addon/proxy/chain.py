"""The proxy's addons, built and ordered in one place, the order checked.

mitmproxy calls each hook on the addons in list order; some addons rely on
another having run before them in the same hook. `build()` makes the list
`addon/usage.py` hands to mitmproxy; `check_order()` refuses any list that
breaks one of the rules below.
"""

from __future__ import annotations

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
