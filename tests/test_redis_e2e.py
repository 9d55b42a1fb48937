"""Pools shared by proxies on several hosts through Redis (real redis-server, real mitmdump, the SDK).

Three proxies with their own SQLite files stand for three hosts.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import openai
import pytest
from redis_server import wait_for
from test_enforce_e2e import ask, race, write_config


def hosts(make_proxy, tmp_path, redis_server, config: str, count: int) -> list:
    """`count` proxies with databases of their own (hosts), sharing pools through one Redis."""
    return [make_proxy(db=tmp_path / f"host{i}.db", options={"usage_config": config, "usage_redis": redis_server.url})
            for i in range(count)]


def premium_used(db) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("select coalesce(sum(total_tokens), 0) from requests where pool = 'premium' "
                            "and outcome = 'ok'").fetchone()[0]
    finally:
        conn.close()


def test_three_hosts_24_clients_share_one_pool(make_proxy, tmp_path, redis_server, capsys):
    limit = 6000  # as the one-host race in test_enforce_e2e (separate databases let 8,901 through 3,000 before)
    config = write_config(tmp_path, limit)
    proxies = hosts(make_proxy, tmp_path, redis_server, config, 3)
    results: list[int] = []
    race([proxies[i % 3].client(max_retries=0) for i in range(24)], results)
    assert len(results) == 24
    assert wait_for(lambda: sum(len(p.rows()) for p in proxies) >= sum(results) + 24)
    used = sum(premium_used(p.db) for p in proxies)
    size = max(r["total_tokens"] for p in proxies for r in p.rows("outcome = 'ok'"))
    with capsys.disabled():
        print(f"\n  3 hosts x 8 clients through Redis, limit {limit}: used {used}, overshoot {used - limit}, "
              f"request ~{size} tokens")
    # Refused before crossing; answers a little longer than their estimate overshoot at most one request per
    # proxy. Each client stops at its first refusal, which the reservations of the others in flight may cause.
    assert limit - 24 * size < used <= limit + 3 * size
    # Every client ended on a refusal, recorded by the proxy that gave it.
    assert wait_for(lambda: sum(len(p.rows("outcome = 'blocked'")) for p in proxies) >= 24)
    # Every proxy refuses now, whichever served the tokens.
    for proxy in proxies:
        with pytest.raises(openai.RateLimitError) as refused:
            ask(proxy.client(max_retries=0))
        assert "'premium'" in refused.value.body["message"]


def test_redis_down_follows_the_fail_policy_and_recovers(make_proxy, tmp_path, redis_server):
    """Redis stopped under traffic: limited pools fail closed (503), track-only ones pass; back when it is."""
    config = write_config(tmp_path, 1_000_000, '[pools.tracked]\nmodels = ["gpt-4.1-nano"]\n')
    proxy = make_proxy(options={"usage_config": config, "usage_redis": redis_server.url})
    client = proxy.client(max_retries=0)
    assert ask(client).usage.total_tokens > 0
    redis_server.stop()
    with pytest.raises(openai.InternalServerError) as failed:
        ask(client)
    assert failed.value.status_code == 503 and "cannot be checked" in failed.value.body["message"]
    # A pool without a limit has nothing to check: it keeps working.
    assert ask(client, model="gpt-4.1-nano").usage.total_tokens > 0
    redis_server.start()
    assert wait_for(lambda: _admitted(client), timeout=20)
    log = proxy.log()
    assert log.count("cannot check limits") == 1  # once per change of state, not per request
    assert "limits can be checked again" in log


def _admitted(client) -> bool:
    try:
        ask(client)
        return True
    except openai.APIStatusError:
        return False


def test_counters_rebuilt_from_the_rows_after_a_restart_without_persistence(make_proxy, tmp_path, redis_server):
    limit = 2000
    config = write_config(tmp_path, limit)
    proxies = hosts(make_proxy, tmp_path, redis_server, config, 2)
    for proxy in proxies:
        for _ in range(3):
            ask(proxy.client(max_retries=0))
    used = sum(premium_used(p.db) for p in proxies)
    assert 0 < used < limit
    redis_server.stop()
    redis_server.start()  # empty: no persistence
    # The first admissions after the restart rebuild the counters from each host's rows (and their
    # heartbeats, within 30 s, for a proxy that sees no traffic).
    for proxy in proxies:
        ask(proxy.client(max_retries=0))
    client = redis_server.client()

    def counted() -> int:
        return sum(int(client.get(k)) for k in client.keys("usage:used:premium::*"))

    # (the rows of the calls just made land in SQLite a few ms after Redis counted them)
    assert wait_for(lambda: counted() == sum(premium_used(p.db) for p in proxies))
    assert counted() == sum(premium_used(p.db) for p in proxies) > used


def test_limit_holds_while_requests_run_on_several_hosts(make_proxy, tmp_path, redis_server):
    """Back-to-back calls alternating between two hosts never pass the limit by more than one request."""
    limit = 1500
    config = write_config(tmp_path, limit)
    proxies = hosts(make_proxy, tmp_path, redis_server, config, 2)
    clients = [p.client(max_retries=0) for p in proxies]
    admitted, refused = 0, False
    for i in range(60):
        try:
            ask(clients[i % 2])
            admitted += 1
        except openai.RateLimitError:
            refused = True
            break
    assert refused and admitted > 3
    used = sum(premium_used(p.db) for p in proxies)
    size = max(r["total_tokens"] for p in proxies for r in p.rows("outcome = 'ok'"))
    assert used <= limit + size


def test_status_and_reset_through_redis(make_proxy, tmp_path, redis_server):
    """`status --redis` shows what every host used; `reset --redis` lets every host admit again."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    limit = 1000
    config = write_config(tmp_path, limit)
    proxies = hosts(make_proxy, tmp_path, redis_server, config, 2)
    with pytest.raises(openai.RateLimitError):
        for i in range(40):
            ask(proxies[i % 2].client(max_retries=0))
    assert wait_for(lambda: sum(len(p.rows("outcome = 'blocked'")) for p in proxies) >= 1)
    time.sleep(0.3)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "addon", *args, "--db", str(proxies[0].db),
                               "--redis", redis_server.url], cwd=ROOT, capture_output=True, text=True, timeout=60)

    shown = {r["pool"]: r for r in json.loads(cli("status", "--json").stdout) if r["key_id"] is None}
    assert shown["premium"]["used"] == sum(premium_used(p.db) for p in proxies)
    assert shown["premium"]["limit"] == limit
    done = cli("reset", "premium", "--note", "test")
    assert done.returncode == 0, done.stderr
    assert ask(proxies[1].client(max_retries=0)).usage.total_tokens > 0


def test_redis_restarted_under_load_loses_and_duplicates_nothing(make_proxy, tmp_path, redis_server):
    """Traffic goes on while Redis stops and comes back empty: every call is answered and recorded once,
    in the local database and, once Redis is back, in the central one."""
    from test_redis_rows import collect_once, count

    config = write_config(tmp_path, 10_000_000, '[pools.tracked]\nmodels = ["gpt-4.1-nano"]\n')
    proxy = make_proxy(options={"usage_config": config, "usage_redis": redis_server.url})
    statuses: list[int] = []
    stop = threading.Event()

    def traffic(model: str) -> None:
        client = proxy.client(max_retries=0)
        while not stop.is_set():
            try:
                ask(client, model=model)
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)

    threads = [threading.Thread(target=traffic, args=(m,)) for m in ("gpt-4o", "gpt-4.1-nano", "gpt-4o")]
    central = tmp_path / "central.db"
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    assert collect_once(central, redis_server.url).returncode == 0  # the collector took what was there
    redis_server.stop()
    time.sleep(2.0)
    redis_server.start()  # empty: no persistence
    time.sleep(2.5)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 20
    assert wait_for(lambda: len(proxy.rows()) == len(statuses))
    assert len(proxy.rows("outcome = 'ok'")) == statuses.count(200)
    # The rows the lost stream held are published again (the last 24 h); the collector keeps each once.
    stream = redis_server.client()
    assert wait_for(lambda: stream.xlen("usage:rows") >= len(statuses), timeout=20), proxy.log()
    assert "publishing the rows of the last 24 hours again" in proxy.log()
    assert collect_once(central, redis_server.url).returncode == 0
    conn = sqlite3.connect(central)
    got = conn.execute("select count(*), count(distinct uid) from requests").fetchone()
    conn.close()
    assert got == (len(statuses), len(statuses))  # nothing lost, nothing twice
    assert count(central) == len(proxy.rows())
