"""This process's leases in memory (addon/ledger/leases.py), without a database: what the event loop may admit
from them, and how finished requests move tokens between spare, leftover and debt."""

from __future__ import annotations

import time

from addon import config as config_mod
from addon.ledger.leases import Lease, Leases, lease_scope
from addon.ledger.policy import checks_for

CONFIG = config_mod.parse("""
[pools.big]
limit = 1000000
models = ["gpt-4o"]
[keys.k1]
limits = { big = 5000 }
""")
POOL = checks_for(CONFIG, "big", None, None)
KEY = checks_for(CONFIG, "big", "k1", None)


def leases_with(spare: int, cap: int | None = None, room: int = 10_000, scope=("big", None)) -> Leases:
    """Leases holding one row (as a committed transaction leaves it) with `spare` tokens."""
    leases = Leases(stale_after=60.0)
    taken = leases.take([scope])
    work = {scope: Lease(id=7, spare=spare, owner="me/1#1", cap=spare if cap is None else cap, room=room)}
    leases.merge(work, taken, [scope])
    leases.confirmed = time.time()
    return leases


def test_the_scope_is_the_pool_and_the_key_with_a_limit_of_its_own():
    assert lease_scope(POOL) == ("big", None)
    assert lease_scope(KEY) == ("big", "k1")


def test_admit_local_takes_from_spare_tokens_only_when_they_cover_the_estimate():
    leases = leases_with(spare=1000)
    decision = leases.admit_local(POOL, 600)
    assert decision is not None and decision.admitted
    assert (decision.reservation, decision.owner, decision.estimate) == (7, "me/1#1", 600)
    assert leases.admit_local(POOL, 600) is None  # 400 left
    assert leases.admit_local(KEY, 1) is None  # another scope: no lease there
    assert Leases(stale_after=60.0).admit_local(POOL, 1) is None  # no row yet


def test_admit_local_stops_when_the_rows_were_not_seen_alive_lately():
    leases = leases_with(spare=1000)
    leases.confirmed = time.time() - 61  # a suspended machine: the row may have expired
    assert leases.admit_local(POOL, 1) is None


def test_unused_estimate_is_spare_again_up_to_the_cap_the_rest_goes_back():
    leases = leases_with(spare=1000, cap=1000)
    assert leases.admit_local(POOL, 800) is not None  # spare 200
    assert leases.settle(7, "me/1#1", 800, 100) == 100  # the row takes the 100 used off the lease
    unlanded, spare = leases.held_here("big", None)
    assert unlanded == 100  # counted as used until its row is written
    assert spare == 200 + 700  # what was left, and the unused estimate (within the cap of 1000)
    leases.landed(7, "me/1#1", 100)
    assert leases.held_here("big", None) == (0, 900)


def test_near_the_limit_unused_estimate_is_leftover_not_spare():
    leases = leases_with(spare=0, cap=0)
    leases.settle(7, "me/1#1", 500, 200)
    freed = leases.take_idle(idle=3600)  # nothing idle: only the leftover leaves
    assert [(row.excess, spare) for _, row, spare in freed] == [(300, 0)]


def test_usage_beyond_the_room_gives_the_spare_tokens_up():
    leases = leases_with(spare=1000, room=50)
    assert leases.admit_local(POOL, 100) is not None
    leases.settle(7, "me/1#1", 100, 300)  # 200 more than estimated: spare pays, room is gone
    assert leases.admit_local(POOL, 1) is None
    assert leases.has_debt() is False  # the spare paid for it
    assert leases.held_here("big", None)[1] == 1000 - 100 - 200  # leftover, to go back


def test_usage_beyond_the_spare_is_a_debt():
    leases = leases_with(spare=0, cap=0)
    leases.settle(7, "me/1#1", 100, 250)
    assert leases.has_debt()


def test_a_replaced_lease_ignores_late_settlements_and_give_backs():
    leases = leases_with(spare=0)
    assert leases.settle(3, "me/1#1", 100, 50) == 100  # not this row: the old row expires on its own
    leases.give_back(7, 100, "other/1#1")
    assert leases.admit_local(POOL, 1) is None


def test_a_failed_transaction_puts_the_taken_tokens_back():
    leases = leases_with(spare=1000)
    taken = leases.take([("big", None)])
    assert leases.admit_local(POOL, 1) is None  # in the transaction's hands
    leases.put_back(taken)
    assert leases.admit_local(POOL, 1000) is not None
