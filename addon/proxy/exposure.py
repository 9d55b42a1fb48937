"""A warning at start when the proxy is reachable beyond this machine without a lock.

A proxy that listens on a network interface lets anyone who reaches it use
it: as an open relay in regular mode and, with issued keys, to spend the
shared OpenAI key. Unless `proxyauth` is set or `[issued_keys] require = true`,
`running` logs a warning that says so.
"""

from __future__ import annotations

import ipaddress
import logging

from mitmproxy import ctx
from mitmproxy.proxy import mode_specs

from addon.proxy.issued_keys import IssuedKeys

log = logging.getLogger(__name__)


def exposed_listen_hosts(modes: list[str] | tuple[str, ...], listen_host: str) -> list[str]:
    """The listen addresses of `modes` that are not loopback ("" is every interface)."""
    exposed = []
    for spec in modes:
        try:
            host = mode_specs.ProxyMode.parse(spec).listen_host(listen_host or None)
        except ValueError:
            continue
        if not _is_loopback(host):
            exposed.append(host or "0.0.0.0")
    return exposed


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (all interfaces) or a name


class ExposureWarning:
    def __init__(self, issued_keys: IssuedKeys) -> None:
        self.issued_keys = issued_keys  # for its settings: require = true locks the proxy

    def running(self) -> None:
        exposed = exposed_listen_hosts(ctx.options.mode, ctx.options.listen_host)
        if not exposed:
            return
        settings = self.issued_keys.settings
        if ctx.options.proxyauth or (settings.enabled and settings.require):
            return
        log.warning(
            "usage: the proxy listens on %s, beyond this machine, and accepts anyone: set proxyauth "
            "(--set proxyauth=user:pass) or [issued_keys] require = true, or listen on 127.0.0.1 "
            "(--listen-host 127.0.0.1). See README, Security.",
            ", ".join(sorted(set(exposed))),
        )
