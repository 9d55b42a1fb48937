"""mitmproxy addon: prices every row the meter writes (metering/pricing.py does the arithmetic)."""

from __future__ import annotations

import gc
import logging
import threading

from addon.metering.pricing import Pricer, shadowed_snapshots
from addon.proxy.meter import UsageMeter

log = logging.getLogger(__name__)


class Pricing:
    """mitmproxy addon: installs a Pricer on the meter, rebuilt when the config changes."""

    def __init__(self, meter: UsageMeter) -> None:
        self.meter = meter

    def configure(self, updated: set[str]) -> None:
        # The meter's own configure ran first (it comes earlier in `addons`).
        if "usage_config" in updated or self.meter.prepare_rows is None:
            first = self.meter.prepare_rows is None
            self.meter.prepare_rows = Pricer.from_config(self.meter.config)
            if self.meter.config is not None and self.meter.config.prices:
                for message in shadowed_snapshots(self.meter.config.prices):
                    log.warning(message)
            if first:
                # Loading the price data takes ~0.5 s: do it now, off the event loop,
                # rather than delay the writer's first batch.
                threading.Thread(target=_warm_up, name="usage-prices-warmup", daemon=True).start()


def _warm_up() -> None:
    try:
        Pricer().cost({"model": "gpt-4o", "input_tokens": 1, "output_tokens": 1})
    except Exception:  # only a warm-up; real rows report their own problems
        log.debug("usage: price data warm-up failed", exc_info=True)
    # The price catalogue and the modules loaded so far live as long as the
    # process: out of the garbage collector's way, a full collection no
    # longer scans them (100+ ms pauses of the event loop under load).
    gc.freeze()
