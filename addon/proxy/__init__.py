"""Thin mitmproxy addons, one per concern; `addon/usage.py` puts them in order."""
