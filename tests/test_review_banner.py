"""Review: the client setup lines `run` prints must be the ones the README checked by hand (issue 11):
Debian 12's curl ignores SSL_CERT_FILE, Node 20 silently ignores NODE_USE_ENV_PROXY."""

from __future__ import annotations

import argparse

from addon.tools.run import banner


def test_banner_client_lines_match_the_readme(tmp_path):
    args = argparse.Namespace(proxy_host="127.0.0.1", proxy_port=8080, datasette_host="127.0.0.1",
                              datasette_port=8001, db=str(tmp_path / "usage.db"), mode=None,
                              mitmdump_args=["--set", f"confdir={tmp_path}"])
    text = banner(args)
    assert "CURL_CA_BUNDLE=" in text
    assert "curl" not in text.split("SSL_CERT_FILE=", 1)[1].split("\n", 1)[0]
    node = [line for line in text.splitlines() if "Node" in line]
    assert node and all("NODE_USE_ENV_PROXY" not in line or "20" in line for line in node)
