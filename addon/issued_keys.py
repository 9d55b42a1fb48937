"""Per-user keys: hand out `sk-usr-…` keys, forward with one shared upstream key.

`python -m addon keys create LABEL` prints a new key once and stores only
its SHA-256. With `[issued_keys] enabled = true` in the config, the proxy
swaps an issued key for the upstream key from the environment, refuses
revoked or unknown issued keys with an OpenAI-shaped 401, and meters the
call under the key's label (via `flow.metadata["usage_identity"]`).

The hook never touches SQLite: a thread keeps an in-memory copy of the
table, reloaded when the database changes (checked every 0.25 s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import meter, store
from .windows import iso_utc

log = logging.getLogger(__name__)

DEFAULTS = {"enabled": False, "upstream_key_env": "OPENAI_API_KEY", "prefix": "sk-usr-", "require": False,
            "self_service": False}
REFRESH_INTERVAL = 0.25


@dataclass(frozen=True, slots=True)
class Settings:
    enabled: bool
    upstream_key_env: str
    prefix: str
    require: bool  # refuse requests that carry no issued key at all
    self_service: bool = False  # Datasette's /-/keys page lets anyone who reaches it create a key (intranets)

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str = "[issued_keys]") -> Settings:
        unknown = set(raw) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{where}: unknown setting {sorted(unknown)[0]!r} (known: {', '.join(sorted(DEFAULTS))})")
        values = {**DEFAULTS, **raw}
        for name in ("enabled", "require", "self_service"):
            if not isinstance(values[name], bool):
                raise ValueError(f"{where}: {name} must be true or false")
        for name in ("upstream_key_env", "prefix"):
            if not isinstance(values[name], str) or not values[name].strip():
                raise ValueError(f"{where}: {name} must be a non-empty string")
        if len(values["prefix"]) > 20:
            raise ValueError(f"{where}: prefix must be at most 20 characters")
        return cls(values["enabled"], values["upstream_key_env"], values["prefix"], values["require"],
                   values["self_service"])


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(36).replace("-", "A").replace("_", "z")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_hash: str
    key_id: str
    key_hint: str
    label: str
    created_at: str
    revoked_at: str | None


# -- database side (CLI and the refresher thread) -------------------------------
def create(db, label: str, prefix: str) -> tuple[str, IssuedKey]:
    key = new_key(prefix)
    row = IssuedKey(key_hash(key), meter.key_id(key), meter.key_hint(key), label,
                    iso_utc(datetime.now(timezone.utc)), None)
    with db.conn:
        db.table("issued_keys").insert(row_dict(row))
    return key, row


def row_dict(row: IssuedKey) -> dict[str, Any]:
    return {name: getattr(row, name) for name in IssuedKey.__slots__}


def load_all(conn: sqlite3.Connection) -> list[IssuedKey]:
    try:
        cursor = conn.execute(
            "select key_hash, key_id, key_hint, label, created_at, revoked_at from issued_keys order by created_at"
        )
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    return [IssuedKey(*row) for row in cursor.fetchall()]


def revoke(db, which: str) -> list[IssuedKey]:
    """Revoke by key id, label or the key itself; returns the keys revoked."""
    ids = {which, meter.key_id(which)}
    now = iso_utc(datetime.now(timezone.utc))
    with db.conn:
        matched = [k for k in load_all(db.conn) if k.revoked_at is None and (k.key_id in ids or k.label == which)]
        for k in matched:
            db.conn.execute("update issued_keys set revoked_at = ? where key_hash = ?", (now, k.key_hash))
    return matched


class KeyCache:
    """In-memory copy of `issued_keys`, kept fresh by a daemon thread."""

    def __init__(self, path: str | Path, interval: float = REFRESH_INTERVAL) -> None:
        self.path = Path(path)
        self.interval = interval
        self.keys: dict[str, IssuedKey] = {}  # key_hash -> key; replaced whole, never mutated
        self.loaded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="issued-keys", daemon=True)
        self._thread.start()

    def get(self, key: str) -> IssuedKey | None:
        return self.keys.get(key_hash(key))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        version = None
        failing = False
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = store.connect(self.path).conn
                    version = None
                # data_version changes whenever another connection commits.
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != version:
                    self.keys = {k.key_hash: k for k in load_all(conn)}
                    version = current
                if failing:
                    log.warning("issued keys: %s readable again", self.path)
                    failing = False
                self.loaded.set()
            except sqlite3.Error as exc:
                if not failing:
                    log.warning("issued keys: cannot read %s (%s); keeping the keys known so far", self.path, exc)
                    failing = True
                if conn is not None:
                    conn.close()
                    conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()


# -- the mitmproxy addon ---------------------------------------------------------
def error_401(message: str) -> tuple[bytes, dict[str, str]]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return json.dumps(body).encode(), {"content-type": "application/json", "x-should-retry": "false"}


class IssuedKeys:
    """Swaps issued keys for the upstream key; goes before UsageMeter in `addons`."""

    def __init__(self, usage_meter: Any = None) -> None:
        self.meter = usage_meter  # for metered_destination(); None: every host
        self.settings = Settings(**DEFAULTS)
        self.upstream_key: str | None = None
        self.cache: KeyCache | None = None

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx, exceptions

        if "usage_config" in updated:
            try:
                cfg = config_mod.load(ctx.options.usage_config or None)
                self.settings = Settings.parse(cfg.issued_keys, f"{cfg.path}: [issued_keys]")
            except (config_mod.ConfigError, ValueError) as exc:
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
        key = meter.credential(headers)
        prefix = self.settings.prefix
        if not key or not key.startswith(prefix):
            if self.settings.require:
                self._refuse(flow, key, None, "This proxy only accepts keys issued for it (" + prefix + "…).")
            return
        issued = self.cache.get(key)
        if issued is None:
            hint = meter.key_hint(key)
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
            identity = {"key_id": meter.key_id(key), "key_hint": meter.key_hint(key), "label": None}
        if identity is not None:
            flow.metadata["usage_identity"] = identity
        body, extra = error_401(message)
        flow.response = http.Response.make(401, body, extra)
        # Never send the issued key anywhere, not even by accident.
        for name in ("authorization", "api-key", "x-api-key"):
            flow.request.headers.pop(name, None)


# -- command line ------------------------------------------------------------------
def register(subparsers) -> None:
    from . import cli

    parser = subparsers.add_parser("keys", help="issue, list and revoke per-user keys",
                                   description="Per-user keys: the proxy forwards them with the shared upstream key.")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    create_p = sub.add_parser("create", help="issue a new key for LABEL (shown once)")
    create_p.add_argument("label")
    create_p.add_argument("--prefix", default=None, help="key prefix (default: [issued_keys] prefix or sk-usr-)")
    cli.add_common(create_p)
    create_p.set_defaults(func=_cmd_create)
    list_p = sub.add_parser("list", help="issued keys with today's usage")
    list_p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cli.add_common(list_p, config=False)
    list_p.set_defaults(func=_cmd_list)
    revoke_p = sub.add_parser("revoke", help="revoke by key id, label or the key itself (takes effect within ~1 s)")
    revoke_p.add_argument("which")
    cli.add_common(revoke_p, config=False)
    revoke_p.set_defaults(func=_cmd_revoke)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _open(path: str):
    db = store.connect(path)
    store.migrate(db)
    return db


def _cmd_create(args: argparse.Namespace) -> int:
    prefix = args.prefix
    if prefix is None:
        cfg = config_mod.load(args.config)
        try:
            prefix = Settings.parse(cfg.issued_keys, f"{cfg.path}: [issued_keys]").prefix
        except ValueError as exc:
            raise config_mod.ConfigError(str(exc)) from None
    label = args.label.strip()
    if not label:
        print("error: LABEL must not be empty")
        return 2
    db = _open(args.db)
    key, row = create(db, label, prefix)
    print(key)
    import sys

    print(f"issued key {row.key_id} for {label!r}; it is shown only this once.", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    db = _open(args.db)
    keys = load_all(db.conn)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    usage = {
        key_id: (n, tokens)
        for key_id, n, tokens in db.conn.execute(
            "select key_id, count(*), coalesce(sum(total_tokens), 0) from requests where ts >= ? group by key_id",
            (today,),
        )
    }
    if args.json:
        out = [{**row_dict(k), "requests_today": usage.get(k.key_id, (0, 0))[0],
                "tokens_today": usage.get(k.key_id, (0, 0))[1]} for k in keys]
        for item in out:
            item.pop("key_hash")
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("key_id", "label", "hint", "created (UTC)", "status", "req today", "tokens today"):
        table.add_column(column, justify="right" if "today" in column else "left", no_wrap=True)
    for k in keys:
        n, tokens = usage.get(k.key_id, (0, 0))
        status = f"revoked {k.revoked_at[:16].replace('T', ' ')}" if k.revoked_at else "active"
        created = k.created_at[:16].replace("T", " ")
        table.add_row(k.key_id, k.label, k.key_hint, created, status, f"{n:,}", f"{tokens:,}")
    console = Console()
    if not console.is_terminal:  # a pipe: never cut columns
        console = Console(width=200)
    console.print(table if keys else "no issued keys (python -m addon keys create LABEL)")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    db = _open(args.db)
    revoked = revoke(db, args.which)
    if not revoked:
        print(f"error: no active issued key matches {args.which!r} (give a key id, a label or the key)")
        return 1
    for k in revoked:
        print(f"revoked {k.key_id} ({k.label}, {k.key_hint})")
    return 0
