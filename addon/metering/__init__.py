"""Pure metering: what a call is, what it used and cost. No mitmproxy, no SQLite."""
