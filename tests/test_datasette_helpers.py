"""Helpers (no tests here) for test_datasette*.py: a real `datasette` process, the canned SQL, pools."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from conftest import ROOT, VENV_BIN, free_port, wait_port

METADATA = ROOT / "datasette-metadata.json"


def metadata() -> dict[str, Any]:
    return json.loads(METADATA.read_text())


def canned_sql(name: str) -> str:
    return metadata()["databases"]["usage"]["queries"][name]["sql"]


def run_canned(db: Path, name: str, **params: str) -> list[dict]:
    """The canned query run straight on SQLite, as Datasette runs it (missing params are '')."""
    sql = canned_sql(name)
    for param in metadata()["databases"]["usage"]["queries"][name].get("params", []):
        params.setdefault(param, "")
    from addon.datasette.plugin import register_functions

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    register_functions(conn)  # as the plugin does for Datasette
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def publish_pools(db_path: Path, config, now: datetime | None = None) -> None:
    """Write `pools` and `pool_windows` the way the proxy does."""
    from addon.ledger.published import write_pools
    from addon.store import schema

    now = now or datetime.now(timezone.utc)
    db = schema.connect(db_path)
    try:
        schema.migrate(db)
        write_pools(db, config, now)
    finally:
        db.conn.close()


class Datasette:
    """`datasette serve` on a free loopback port with the project's metadata."""

    def __init__(self, db: Path, log: Path, metadata_path: Path = METADATA) -> None:
        self.port = free_port()
        self.log_path = log
        handle = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "datasette"), "serve", str(db), "--metadata", str(metadata_path),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        try:
            wait_port(self.port, timeout=30, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"datasette did not start:\n{log.read_text(errors='replace')}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"{path}: HTTP {status}: {body[:2000]!r}"
        return json.loads(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
