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
        # With eager connections mitmproxy derives the request's host from the
        # (rerouted) server address; give the request its real host back.
        target = _target()
        if target and (flow.request.host, flow.request.port) == target:
            sni = flow.server_conn.sni or "api.openai.com"
            flow.request.host = sni if sni in UPSTREAM_HOSTS else "api.openai.com"
            flow.request.port = 443


addons = [Route()]
