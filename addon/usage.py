"""mitmproxy entry point: `mitmdump -s addon/usage.py`.

Meters OpenAI API traffic into SQLite; see README.md for options.
"""

import sys
from pathlib import Path

# mitmproxy loads this file as a script, not as part of the package.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addon.proxy.bodylog import BodyLog  # noqa: E402
from addon.proxy.exposure import ExposureWarning  # noqa: E402
from addon.proxy.intercept import InterceptOnlyMetered  # noqa: E402
from addon.proxy.issued_keys import IssuedKeys  # noqa: E402
from addon.proxy.limits import Limits  # noqa: E402
from addon.proxy.meter import UsageMeter  # noqa: E402
from addon.proxy.pricing import Pricing  # noqa: E402
from addon.proxy.redis_rows import RedisRows  # noqa: E402
from addon.proxy.websocket import WebSocketMeter  # noqa: E402

meter = UsageMeter()
limits = Limits(meter)
# IssuedKeys goes first: it sets the identity the meter records.
# WebSocketMeter precedes the meter: its done() records responses in flight before the meter closes the writer.
# Limits comes right after the meter, whose request hook classifies the call.
# Pricing follows the meter: it prices rows with the meter's freshly loaded config.
# InterceptOnlyMetered decides at the TLS handshake, before any request.
issued = IssuedKeys(meter)
addons = [InterceptOnlyMetered(meter), issued, WebSocketMeter(meter, limits), meter, Pricing(meter), limits,
          BodyLog(meter), ExposureWarning(issued), RedisRows()]
