"""mitmproxy addon: swaps issued keys (`sk-usr-…`) for the shared upstream key, refuses unknown or revoked ones.

The keys and their cache live in store/issued_keys.py; the hook never touches SQLite.
"""

from __future__ import annotations

import json
import os

from addon import config as config_mod
from addon.metering import wire
from addon.proxy.meter import UsageMeter
from addon.store.issued_keys import KeyCache


def error_401(message: str) -> tuple[bytes, dict[str, str]]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return json.dumps(body).encode(), {"content-type": "application/json", "x-should-retry": "false"}


class IssuedKeys:
    """Swaps issued keys for the upstream key; goes before UsageMeter in `addons`."""

    def __init__(self, usage_meter: UsageMeter | None = None) -> None:
        self.meter = usage_meter  # for metered_destination(); None: every host
        self.settings = config_mod.IssuedKeysSettings()
        self.upstream_key: str | None = None
        self.cache: KeyCache | None = None

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx, exceptions

        if "usage_config" in updated:
            try:
                self.settings = config_mod.load_shared(ctx.options.usage_config or None).issued_keys
            except config_mod.ConfigError as exc:
                raise exceptions.OptionsError(str(exc)) from None
        if self.settings.enabled:
            upstream = os.environ.get(self.settings.upstream_key_env, "").strip()
            if not upstream:
                raise exceptions.OptionsError(
                    f"[issued_keys] is enabled but the environment variable {self.settings.upstream_key_env} "
                    "(upstream_key_env) holding the shared OpenAI key is empty or unset"
                )
            if upstream.startswith(self.settings.prefix):
                raise exceptions.OptionsError(
                    f"{self.settings.upstream_key_env} holds an issued key ({self.settings.prefix}…), not an OpenAI key"
                )
            self.upstream_key = upstream
            if self.cache is None or "usage_db" in updated:
                old, self.cache = self.cache, KeyCache(ctx.options.usage_db)
                if old is not None:
                    old.close()
                self.cache.loaded.wait(2)  # usually a few ms; requests before that see no keys
        elif self.cache is not None:
            self.cache.close()
            self.cache = None

    def done(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def request(self, flow) -> None:
        if not self.settings.enabled or self.cache is None or flow.response is not None:
            return
        if self.meter is not None and self.meter.metered_destination(flow) is None:
            return
        if flow.request.scheme != "https":  # usage_plain_http: metered, but the shared key never goes in clear
            return
        headers = flow.request.headers
        key = wire.credential(headers)
        prefix = self.settings.prefix
        if not key or not key.startswith(prefix):
            if self.settings.require:
                self._refuse(flow, key, None, "This proxy only accepts keys issued for it (" + prefix + "…).")
            return
        issued = self.cache.get(key)
        if issued is None:
            hint = wire.key_hint(key)
            self._refuse(flow, key, None, f"Incorrect API key provided: {hint}. This issued key is unknown.")
            return
        identity = {"key_id": issued.key_id, "key_hint": issued.key_hint, "label": issued.label}
        flow.metadata["usage_identity"] = identity
        if issued.revoked_at is not None:
            self._refuse(flow, key, identity, f"The API key {issued.key_hint} ({issued.label}) was revoked.")
            return
        # Swap the credential wherever the client put it.
        if "authorization" in headers:
            headers["authorization"] = f"Bearer {self.upstream_key}"
        for name in ("api-key", "x-api-key"):
            if name in headers:
                headers[name] = self.upstream_key

    def _refuse(self, flow, key: str | None, identity: dict | None, message: str) -> None:
        from mitmproxy import http

        if identity is None and key:
            identity = {"key_id": wire.key_id(key), "key_hint": wire.key_hint(key), "label": None}
        if identity is not None:
            flow.metadata["usage_identity"] = identity
        body, extra = error_401(message)
        flow.response = http.Response.make(401, body, extra)
        # Never send the issued key anywhere, not even by accident.
        for name in ("authorization", "api-key", "x-api-key"):
            flow.request.headers.pop(name, None)
