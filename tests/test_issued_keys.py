"""Per-user issued keys: CLI, the proxy swapping them for the upstream key, 401s."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import openai
import pytest
from conftest import ROOT, start_proxy

from addon.metering import wire
from addon.store import issued_keys, schema

UPSTREAM = "sk-proj-upstreamSHARED0123456789abcd"

CONFIG = """
timezone = "UTC"
default_pool = "premium"
[pools.premium]
limit = 1_000_000
window = "day"
models = ["gpt-4o", "gpt-5"]
[issued_keys]
enabled = true
upstream_key_env = "TEST_UPSTREAM_KEY"
prefix = "sk-usr-"
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addon", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.fixture
def setup(tmp_path, make_proxy):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    db = tmp_path / "usage.db"

    def start(mode: str = "regular"):
        return make_proxy(mode=mode, db=db, options={"usage_config": str(config)},
                          extra_env={"TEST_UPSTREAM_KEY": UPSTREAM})

    return config, db, start


def create_key(db, config, label: str) -> str:
    result = cli("keys", "create", label, "--db", str(db), "--config", str(config))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("sk-usr-") and len(key) > 40
    assert "shown only this once" in result.stderr
    return key


def chat(client, **extra):
    return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], **extra)


@pytest.mark.parametrize("mode", ["regular", "reverse"])
def test_issued_key_is_swapped_for_upstream_key_and_metered_by_label(setup, fake_server, mode):
    config, db, start = setup
    key = create_key(db, config, "alice")
    # Only the hash is stored: the key is nowhere in the database file.
    assert key.encode() not in db.read_bytes()
    proxy = start(mode)
    fake_server.state.clear()
    answer = chat(proxy.client(api_key=key, max_retries=0))
    assert answer.usage.total_tokens > 0
    upstream = fake_server.state.calls("/chat/completions")
    assert [c.headers["authorization"] for c in upstream] == [f"Bearer {UPSTREAM}"]
    (row,) = proxy.wait_rows(1)
    assert row["label"] == "alice"
    assert row["key_id"] == wire.key_id(key) == issued_keys.key_hash(key)[:12]
    assert row["key_hint"] == wire.key_hint(key)
    assert row["total_tokens"] == answer.usage.total_tokens
    assert UPSTREAM.encode() not in db.read_bytes()


def test_unknown_and_revoked_keys_get_openai_shaped_401(setup, fake_server):
    config, db, start = setup
    key = create_key(db, config, "bob")
    proxy = start()
    fake_server.state.clear()
    client = proxy.client(api_key=key, max_retries=0)
    chat(client)

    with pytest.raises(openai.AuthenticationError) as info:
        chat(proxy.client(api_key="sk-usr-notIssuedByThisProxy0123456789", max_retries=0))
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] is None
    assert info.value.response.headers["x-should-retry"] == "false"

    result = cli("keys", "revoke", "bob", "--db", str(db))
    assert result.returncode == 0 and "revoked" in result.stdout
    # The proxy's cache picks the revocation up within about a second.
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(client)
        except openai.AuthenticationError as exc:
            assert "revoked" in exc.message
            break
        assert time.monotonic() < deadline, "revocation never took effect"
        time.sleep(0.1)
    # Neither refused call reached upstream; all were recorded.
    assert all(c.headers["authorization"] == f"Bearer {UPSTREAM}" for c in fake_server.state.calls("/chat"))
    rows = proxy.wait_rows(2, "status = 401")
    assert sorted(r["label"] or "" for r in rows) == ["", "bob"]
    assert len(fake_server.state.calls("/chat")) == len(proxy.rows("status = 200"))


def test_key_created_while_running_works_and_plain_keys_pass_through(setup, fake_server):
    config, db, start = setup
    proxy = start()
    key = create_key(db, config, "carol")
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(proxy.client(api_key=key, max_retries=0))
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "new key never accepted"
            time.sleep(0.1)
    fake_server.state.clear()
    own = "sk-proj-ownKey0123456789abcdefghij"
    chat(proxy.client(api_key=own, max_retries=0))
    assert fake_server.state.calls("/chat")[0].headers["authorization"] == f"Bearer {own}"


def test_cli_list_and_revoke(tmp_path):
    db = tmp_path / "k.db"
    first = create_key_plain(db, "dave")
    create_key_plain(db, "erin")
    listed = json.loads(cli("keys", "list", "--json", "--db", str(db)).stdout)
    assert [k["label"] for k in listed] == ["dave", "erin"]
    assert all("key_hash" not in k for k in listed)
    assert listed[0]["key_id"] == wire.key_id(first) and listed[0]["revoked_at"] is None
    table = cli("keys", "list", "--db", str(db)).stdout
    assert "dave" in table and "active" in table
    assert cli("keys", "revoke", wire.key_id(first), "--db", str(db)).returncode == 0
    again = cli("keys", "revoke", wire.key_id(first), "--db", str(db))
    assert again.returncode == 1 and "no active issued key" in again.stderr
    listed = json.loads(cli("keys", "list", "--json", "--db", str(db)).stdout)
    assert listed[0]["revoked_at"] and listed[1]["revoked_at"] is None
    conn = schema.connect(db).conn
    assert issued_keys.KeyCache  # the proxy reads the same rows
    assert [k.label for k in issued_keys.load_all(conn)] == ["dave", "erin"]


def create_key_plain(db, label: str) -> str:
    result = cli("keys", "create", label, "--db", str(db))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        ('enabled = true\nupstream_key_env = "TEST_UNSET_KEY_VAR"', {}, "TEST_UNSET_KEY_VAR"),
        ("enabled = true\nbogus = 1", {"OPENAI_API_KEY": UPSTREAM}, "unknown setting 'bogus'"),
        ('enabled = "yes"', {}, "enabled must be true or false"),
    ],
)
def test_bad_settings_stop_startup_with_a_clear_message(tmp_path, confdir, fake_server, settings, env, message):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.split("[issued_keys]")[0] + "[issued_keys]\n" + settings + "\n")
    with pytest.raises(RuntimeError) as info:
        proxy = start_proxy(tmp_path, confdir, fake_server.port, options={"usage_config": str(config)}, extra_env=env)
        # mitmdump may listen before it notices: give it the chance to exit.
        proxy.proc.wait(10)
        raise RuntimeError(proxy.log())
    assert message in str(info.value)


def test_by_user_canned_query(setup, fake_server):
    queries = json.loads((ROOT / "datasette-metadata.json").read_text())["databases"]["usage"]["queries"]
    config, db, start = setup
    alice, bob = create_key(db, config, "alice"), create_key(db, config, "bob")
    proxy = start()
    answers = [chat(proxy.client(api_key=key, max_retries=0)) for key in (alice, alice, bob)]
    with pytest.raises(openai.AuthenticationError):
        chat(proxy.client(api_key="sk-usr-forged000000000000000000000000000", max_retries=0))
    proxy.wait_rows(4)
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = {r["user"]: dict(r) for r in conn.execute(queries["by_user"]["sql"], {"days": ""})}
    assert rows["alice"]["requests"] == 2 and rows["bob"]["requests"] == 1
    assert rows["alice"]["tokens"] == sum(a.usage.total_tokens for a in answers[:2])
    assert rows["bob"]["tokens"] == answers[2].usage.total_tokens
    (forged,) = [r for user, r in rows.items() if user.startswith("key sk-")]
    assert forged["refused_401"] == 1 and forged["tokens"] == 0
