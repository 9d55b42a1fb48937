"""The ledger in Redis: pools shared by proxies on several hosts (real redis-server)."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis

from addon import config as config_mod
from addon.ledger.policy import checks_for
from addon.ledger.redis_ledger import RedisLedger
from addon.store import inserts, schema
from addon.store.inserts import Reservation

CONFIG = """
timezone = "Europe/Paris"
[pools.premium]
limit = 3000
models = ["gpt-4o"]
[pools.rolling]
limit = 1000
window = "rolling:24h"
models = ["o3"]
[pools.other]
models = ["text-embedding-*"]
[keys.k1]
label = "alice"
limits = { premium = 500 }
"""



@pytest.fixture
def config():
    return config_mod.parse(CONFIG)


def ledger(server, tmp_path, config, name="host", **kwargs) -> RedisLedger:
    return RedisLedger(server.url, tmp_path / f"{name}.db", config, **kwargs)


def checks(config, pool="premium", key=None):
    return checks_for(config, pool, key, None)


def row(pool, key_id, tokens, **more):
    return {"pool": pool, "key_id": key_id, "total_tokens": tokens, **more}


def held(decision):
    """What an admitted call carries to its row (Limits: call.extra["reservation"])."""
    return Reservation(decision.reservation, decision.estimate, decision.owner)


def status_of(led, pool="premium", key=None):
    return next(s for s in led.status() if s.pool == pool and s.key_id == key)


def test_three_hosts_24_clients_one_pool(tmp_path, redis_server, config):
    """Three proxies (separate SQLite files), 24 clients: refused before crossing, overshoot bounded."""
    hosts = [ledger(redis_server, tmp_path, config, f"host{i}") for i in range(3)]
    estimate, actual = 100, 110  # every answer is a little longer than estimated
    outcomes: list[bool] = []
    lock = threading.Lock()
    ledger_threads = [threading.Lock() for _ in hosts]  # each proxy decides on one ledger thread

    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            ask(i)
        except BaseException as exc:  # seen by the assertion below, not lost in a thread
            errors.append(exc)

    def ask(i: int) -> None:
        led = hosts[i % 3]
        rng = random.Random(i)
        for _ in range(20):
            with ledger_threads[i % 3]:
                decision = led.admit(checks(config), estimate)
            with lock:
                outcomes.append(decision.admitted)
            if decision.admitted:
                time.sleep(rng.random() * 0.01)
                led.record(row("premium", None, actual), held(decision))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for led in hosts:
        assert led.flush()
    used = status_of(hosts[0]).used
    admitted = sum(outcomes)
    assert used == admitted * actual
    # Refused before crossing: admissions stop once used + reserved + estimate > limit. Only the answers
    # longer than their estimate overshoot; bound: one request per proxy.
    assert 3000 - estimate < used + (actual - estimate) * 24
    overshoot = used - 3000
    print(f"\n  3 hosts x 8 clients, limit 3000: used {used}, overshoot {overshoot}, request ~{actual}")
    assert overshoot <= 3 * actual
    assert all(s.reserved == 0 for s in hosts[1].status())
    for led in hosts:
        led.close()


def test_key_limit_and_refusal_numbers(tmp_path, redis_server, config):
    led = ledger(redis_server, tmp_path, config)
    first = led.admit(checks(config, key="k1"), 400)
    assert first.admitted
    refused = led.admit(checks(config, key="k1"), 200)
    assert not refused.admitted and refused.check.key_id == "k1"
    assert (refused.used, refused.reserved, refused.estimate) == (0, 400, 200)
    led.record(row("premium", "k1", 300), held(first))
    led.flush()
    assert (status_of(led, key="k1").used, status_of(led, key="k1").reserved) == (300, 0)
    assert status_of(led).used == 300  # the key's tokens are the pool's too
    assert led.admit(checks(config, key="k1"), 200).admitted
    led.close()


def test_skewed_clocks_count_into_the_same_window(tmp_path, redis_server, config):
    """Windows come from Redis's clock: a host five hours ahead counts into the same day."""
    ahead = ledger(redis_server, tmp_path, config, "ahead",
                   clock=lambda: datetime.now(timezone.utc) + timedelta(hours=5))
    exact = ledger(redis_server, tmp_path, config, "exact")
    decision = ahead.admit(checks(config), 2000)
    ahead.record(row("premium", None, 2000), held(decision))
    ahead.flush()
    assert not exact.admit(checks(config), 1500).admitted
    a, e = status_of(ahead), status_of(exact)
    assert (a.used, a.resets_at) == (e.used, e.resets_at) == (2000, e.resets_at)
    assert e.resets_at > datetime.now(timezone.utc) > e.window_start
    ahead.close()
    exact.close()


def test_reset_is_seen_by_every_host(tmp_path, redis_server, config):
    one, two = ledger(redis_server, tmp_path, config, "one"), ledger(redis_server, tmp_path, config, "two")
    decision = one.admit(checks(config), 2900)
    one.record(row("premium", None, 2900), held(decision))
    one.flush()
    assert not two.admit(checks(config), 200).admitted
    two.add_reset("premium", note="test")
    assert status_of(one).used == 0
    assert one.admit(checks(config), 200).admitted
    one.close()
    two.close()


def test_reservations_of_a_killed_proxy_expire(tmp_path, redis_server, config):
    dead = ledger(redis_server, tmp_path, config, "dead", ttl=1.0)
    assert dead.admit(checks(config), 2500).admitted  # then kill -9: never settled
    alive = ledger(redis_server, tmp_path, config, "alive")
    assert not alive.admit(checks(config), 1000).admitted
    time.sleep(1.2)
    assert alive.admit(checks(config), 1000).admitted
    alive.close()


def test_heartbeat_keeps_live_reservations(tmp_path, redis_server, config):
    led = ledger(redis_server, tmp_path, config, ttl=1.0)
    assert led.admit(checks(config), 2500).admitted
    for _ in range(4):
        time.sleep(0.4)
        led.heartbeat()
    assert status_of(led).reserved == 2500
    led.close()


def test_rolling_window(tmp_path, redis_server, config):
    led = ledger(redis_server, tmp_path, config)
    decision = led.admit(checks(config, "rolling"), 600)
    led.record(row("rolling", None, 600), held(decision))
    led.flush()
    assert not led.admit(checks(config, "rolling"), 600).admitted
    status = status_of(led, "rolling")
    assert (status.used, status.resets_at) == (600, None)
    led.close()


def test_restart_without_persistence_rebuilds_counters_from_the_rows(tmp_path, redis_server, config):
    """Each proxy adds its own database's rows of the current windows, once."""
    now = datetime.now(timezone.utc)
    ts = now.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    for name, tokens in (("a", 1200), ("b", 900)):
        db = schema.connect(tmp_path / f"{name}.db")
        schema.migrate(db)
        with db.conn:
            inserts.insert_rows(db, [{"ts": ts, "pool": "premium", "total_tokens": tokens, "key_id": "k1"},
                                   {"ts": ts, "pool": "rolling", "total_tokens": tokens // 3}])
        db.conn.close()
    a, b = ledger(redis_server, tmp_path, config, "a"), ledger(redis_server, tmp_path, config, "b")
    a.admit(checks(config), 1)
    b.admit(checks(config), 1)  # both databases contributed to this Redis epoch
    assert status_of(a).used == 2100
    redis_server.stop()
    with pytest.raises(redis.RedisError):
        a.admit(checks(config), 100)  # Limits turns this into the pool's fail policy
    redis_server.start()
    # After the restart the first admission (or heartbeat) of each proxy finds the epoch gone or new,
    # and adds its own rows: until every proxy has, the pool counts only theirs.
    assert a.admit(checks(config), 1).admitted
    assert status_of(a).used == 1200
    b.heartbeat()
    assert not a.admit(checks(config), 1000).admitted  # 2,100 used + 1,000 > 3,000
    assert status_of(a).used == 2100
    assert status_of(b, key="k1").used == 2100
    assert status_of(b, "rolling").used == 400 + 300
    # A second proxy process on database "a" adds nothing more.
    a2 = ledger(redis_server, tmp_path, config, "a")
    a2.admit(checks(config), 1)
    assert status_of(a2).used == 2100
    for led in (a, b, a2):
        led.close()


def test_markers_are_once_across_proxies(tmp_path, redis_server, config):
    one, two = ledger(redis_server, tmp_path, config, "one"), ledger(redis_server, tmp_path, config, "two")
    assert one.claim_response("resp_1") and not two.claim_response("resp_1")
    assert two.claim_alert("premium||2026-11-30|80") and not one.claim_alert("premium||2026-11-30|80")
    one.close()
    two.close()


def test_a_response_counts_once_across_proxies_and_continuations_find_it(tmp_path, redis_server, config):
    one, two = ledger(redis_server, tmp_path, config, "one"), ledger(redis_server, tmp_path, config, "two")
    for led in (one, two):  # a background response read through two proxies
        led.record(row("premium", None, 900, response_id="resp_9", conversation="conv_1", input_tokens=600,
                       output_tokens=300), None)
        led.flush()
    assert status_of(one).used == 900
    assert two.previous_usage("resp_9", None) == one.previous_usage(None, "conv_1")
    assert (one.previous_usage("resp_9", None).input_tokens, one.previous_usage("resp_9", None).output_tokens) == (
        600, 300)
    assert one.previous_usage("resp_unknown", None) is None
    one.close()
    two.close()
