"""TLS interception only for metered hosts: everything else is tunnelled as is.

With `HTTPS_PROXY` set for a whole shell, pip, git and browsers go through
the proxy too. Their TLS connections are passed through untouched
(`tls_clienthello` sets `ignore_connection`), so they keep their own
certificates and are never decrypted; only connections whose target is one
of `usage_hosts` are intercepted (and need the mitmproxy CA).
`--set usage_intercept_all=true` decrypts every connection again (debugging).

The target is the connection's address (the CONNECT authority in regular
and upstream mode), not the TLS SNI, which the client chooses freely. In
reverse mode every connection goes to the configured target and is kept.
"""

from __future__ import annotations

from mitmproxy import ctx, tls
from mitmproxy.proxy import mode_specs

from addon.proxy.meter import UsageMeter


class InterceptOnlyMetered:
    def __init__(self, usage_meter: UsageMeter) -> None:
        self.meter = usage_meter  # for is_metered()

    def load(self, loader) -> None:
        loader.add_option(
            "usage_intercept_all", bool, False,
            "Decrypt TLS to every host (debugging). By default only connections to usage_hosts are "
            "intercepted; all other TLS traffic is tunnelled untouched, with the server's own certificate.",
        )

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if ctx.options.usage_intercept_all or data.ignore_connection:
            return
        context = data.context
        if isinstance(context.client.proxy_mode, mode_specs.ReverseMode):
            return
        address = context.server.address
        if address is None:
            return  # TLS to the proxy itself (an https:// proxy URL): no target yet
        if not self.meter.is_metered(address[0]):
            data.ignore_connection = True
