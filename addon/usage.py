"""mitmproxy entry point: `mitmdump -s addon/usage.py`.

Meters OpenAI API traffic into SQLite; see README.md for options.
"""

import sys
from pathlib import Path

# mitmproxy loads this file as a script, not as part of the package.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addon.proxy.chain import Chain, build  # noqa: E402

# The order of the addons matters; addon/proxy/chain.py builds and checks it,
# and Chain hands them to mitmproxy as one addon (cheaper hook dispatch).
addons = [Chain(build())]
