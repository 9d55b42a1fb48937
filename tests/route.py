"""Test-only mitmproxy addon: route api.openai.com to the fake server.

It stands in for DNS and nothing else: connections to api.openai.com go to
FAKE_OPENAI_ADDR=127.0.0.1:PORT, while mitmproxy (and the usage addon) keep
api.openai.com as the connection's address and the request's host, exactly
as in production. Load it before addon/usage.py.

The address is swapped just for the TCP connect (`server_connect`) and given
back once the socket is open (`server_connected`), the way a resolver's
answer only shows in the peer address.
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
    def __init__(self) -> None:
        self.resolved: dict[str, tuple[str, int]] = {}  # server connection id -> its name

    def server_connect(self, data) -> None:
        target = _target()
        address = data.server.address
        if target and address and address[0] in UPSTREAM_HOSTS:
            self.resolved[data.server.id] = address
            data.server.address = target

    def server_connected(self, data) -> None:
        name = self.resolved.pop(data.server.id, None)
        if name is not None:
            # mitmproxy refuses to change the address of an open connection;
            # here it only gives back the name the connection was opened for.
            object.__setattr__(data.server, "address", name)

    def server_connect_error(self, data) -> None:
        name = self.resolved.pop(data.server.id, None)
        if name is not None:
            data.server.address = name


addons = [Route()]
