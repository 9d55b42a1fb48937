"""Test-only mitmproxy addon: route api.openai.com to the fake server.

It stands in for DNS and nothing else: connections to api.openai.com go to
FAKE_OPENAI_ADDR=127.0.0.1:PORT, and requests keep api.openai.com as their
host, exactly as the usage addon sees them in production. Load it before
addon/usage.py.
"""

import os

UPSTREAM_HOSTS = ("api.openai.com", "eu.api.openai.com")


def _target() -> tuple[str, int] | None:
    target = os.environ.get("FAKE_OPENAI_ADDR")
    if not target:
        return None
    addr, port = target.rsplit(":", 1)
    return addr, int(port)


class Route:
    def server_connect(self, data) -> None:
        target = _target()
        if target and data.server.address and data.server.address[0] in UPSTREAM_HOSTS:
            data.server.address = target

    def requestheaders(self, flow) -> None:
        # mitmproxy takes the request's host from the (rerouted) server
        # connection; give the Host header its real name back, as production
        # traffic has it, and leave the address alone so connections are reused.
        target = _target()
        if target and (flow.request.host, flow.request.port) == target:
            sni = flow.server_conn.sni if flow.server_conn.sni in UPSTREAM_HOSTS else "api.openai.com"
            flow.request.headers["host"] = sni


addons = [Route()]
