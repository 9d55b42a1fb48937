"""Review: `status` must add up. A lease's spare tokens count against `remaining` but were shown in no column
(used 30, reserved 0, remaining 1,939 of 2,000), while its help says `reserved` includes them."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import ROOT

from addon.store import schema

CONFIG = """
timezone = "UTC"
[pools.premium]
limit = 2000
models = ["gpt-4o"]
"""


def test_status_table_shows_held_spare(tmp_path):
    db_path = tmp_path / "usage.db"
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    db = schema.connect(db_path)
    schema.migrate(db)
    now = time.time()
    db["reservations"].insert({"pool": "premium", "key_id": None, "tokens": 31, "created": now, "expires": now + 60,
                               "owner": "other-proxy", "spare": 31})
    db.conn.close()
    out = subprocess.run([sys.executable, "-m", "addon", "status", "--db", str(db_path), "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0, out.stderr
    premium = next(line for line in out.stdout.splitlines() if "premium" in line)
    assert "1,969" in premium  # remaining
    assert "31" in premium.replace("1,969", "")  # the held spare, in a column of its own
