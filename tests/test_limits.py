"""Windows, estimates and the ledger, on real SQLite files with an injected clock."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from addon import config as config_mod
from addon.ledger.policy import Check, checks_for, never_fits, refusal_message
from addon.ledger.published import window_rows, write_pools
from addon.ledger.sqlite_ledger import Ledger
from addon.store import inserts, schema
from addon.store.writer import Writer
from addon.windows import Window, iso_utc

UTC = timezone.utc
PARIS = ZoneInfo("Europe/Paris")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- windows ---------------------------------------------------------------


def test_day_window_utc():
    start, end = Window.parse("day").bounds(utc(2026, 11, 22, 7, 30), ZoneInfo("UTC"))
    assert (start, end) == (utc(2026, 11, 22), utc(2026, 11, 23))


def test_week_starts_monday_and_month_bounds():
    # 2026-11-22 is a Sunday.
    start, end = Window.parse("week").bounds(utc(2026, 11, 22, 12), ZoneInfo("UTC"))
    assert start == utc(2026, 11, 16) and end == utc(2026, 11, 23)
    start, end = Window.parse("month").bounds(utc(2026, 12, 31, 23, 59), ZoneInfo("UTC"))
    assert start == utc(2026, 12, 1) and end == utc(2027, 1, 1)


def test_day_window_in_a_timezone_across_dst():
    # Paris leaves summer time on 2026-10-25: that local day lasts 25 hours.
    start, end = Window.parse("day").bounds(utc(2026, 10, 25, 12), PARIS)
    assert start == utc(2026, 10, 24, 22) and end == utc(2026, 10, 25, 23)
    assert end - start == timedelta(hours=25)
    # Spring forward on 2026-03-29: 23 hours.
    start, end = Window.parse("day").bounds(utc(2026, 3, 29, 12), PARIS)
    assert end - start == timedelta(hours=23)
    # Just before local midnight in UTC terms belongs to the next local day.
    start, _ = Window.parse("day").bounds(utc(2026, 11, 22, 23, 30), PARIS)
    assert start == utc(2026, 11, 22, 23)


def test_midnight_that_does_not_exist():
    # America/Santiago jumps from 00:00 to 01:00 on 2026-09-06.
    tz = ZoneInfo("America/Santiago")
    start, end = Window.parse("day").bounds(utc(2026, 9, 6, 15), tz)
    assert start.astimezone(tz).hour == 1 and end - start == timedelta(hours=23)


def test_rolling_window():
    now = utc(2026, 11, 22, 7)
    window = Window.parse("rolling:24h")
    assert window.bounds(now, PARIS) == (now - timedelta(hours=24), now)
    with pytest.raises(ValueError):
        Window.parse("rolling:0h")
    with pytest.raises(ValueError):
        Window.parse("fortnight")


def test_window_rows_cover_the_future_without_gaps():
    pool = config_mod.Pool("p", (), Window.parse("day"), 10)
    rows = window_rows(pool, PARIS, utc(2026, 10, 20), days_ahead=30)
    assert len(rows) == 31  # the current window, then 30 days ahead
    for earlier, later in zip(rows, rows[1:], strict=False):
        assert earlier["end"] == later["start"]
    assert any(r["start"] == "2026-10-24T22:00:00.000Z" and r["end"] == "2026-10-25T23:00:00.000Z" for r in rows)


# -- ledger ----------------------------------------------------------------

CONFIG = """
timezone = "Europe/Paris"
default_pool = "premium"
[pools.premium]
limit = 1000
window = "day"
models = ["gpt-4o"]
[pools.hourly]
limit = 500
window = "rolling:2h"
models = ["o3"]
[pools.free]
models = ["text-embedding-*"]
[pools.big]
limit = 1000000
models = ["gpt-big"]
[keys.k1]
label = "k1"
limits = { big = 1000000 }
[keys.abc123]
label = "alice"
limits = { premium = 300 }
"""


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def setup(tmp_path):
    config = config_mod.parse(CONFIG, tmp_path / "c.toml")
    db = schema.connect(tmp_path / "usage.db")
    schema.migrate(db)
    clock = Clock(utc(2026, 11, 22, 10))
    ledger = Ledger(tmp_path / "usage.db", config, clock=clock)
    yield config, db, clock, ledger
    ledger.close()


def add_row(db, ts: datetime, pool: str, tokens: int, key_id: str | None = None,
            reservation: tuple[int, int, str] | None = None):
    row = {"ts": iso_utc(ts), "pool": pool, "total_tokens": tokens, "key_id": key_id, "outcome": "ok"}
    if reservation:
        row["_reservation"] = inserts.Reservation(*reservation)
    with db.conn:
        inserts.insert_rows(db, [row])


def test_admission_counts_rows_and_reservations(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", None, None)
    add_row(db, clock.now - timedelta(hours=1), "premium", 600)
    add_row(db, clock.now - timedelta(days=1), "premium", 900)  # yesterday: not counted
    first = ledger.admit(checks, 300)
    assert first.admitted
    refused = ledger.admit(checks, 150)  # 600 used + 300 reserved + 150 > 1000
    assert not refused.admitted and refused.used == 600 and refused.reserved == 300
    assert refused.resets_at == utc(2026, 11, 22, 23)  # midnight in Paris
    # The request settles with fewer tokens than reserved: room again.
    add_row(db, clock.now, "premium", 250, reservation=(first.reservation, 300, first.owner))
    assert db.execute("select sum(tokens) from reservations").fetchone()[0] == 0
    assert ledger.admit(checks, 150).admitted


def test_window_rollover_in_the_configured_timezone(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", None, None)
    add_row(db, clock.now, "premium", 950)
    assert not ledger.admit(checks, 100).admitted
    clock.now = utc(2026, 11, 22, 22, 59)  # 23:59 in Paris
    assert not ledger.admit(checks, 100).admitted
    clock.now = utc(2026, 11, 22, 23, 0)  # midnight in Paris: new day
    assert ledger.admit(checks, 100).admitted


def test_rolling_window_slides(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "hourly", None, None)
    add_row(db, clock.now - timedelta(minutes=90), "hourly", 400)
    assert not ledger.admit(checks, 200).admitted
    clock.now += timedelta(minutes=31)  # the 400 aged out of the 2h window
    assert ledger.admit(checks, 200).admitted


def test_key_limit_and_pool_limit_both_apply(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", "abc123", None)
    assert [c.key_id for c in checks] == [None, "abc123"]
    add_row(db, clock.now, "premium", 250, key_id="abc123")
    refused = ledger.admit(checks, 100)
    assert not refused.admitted and refused.check.key_id == "abc123"
    # Another key still has the pool's room.
    assert ledger.admit(checks_for(config, "premium", "other", None), 100).admitted
    # Labels work as the key of a rule too.
    assert len(checks_for(config, "premium", "zzz", "abc123")) == 2


def test_track_only_pool_has_no_checks(setup):
    config, *_ = setup
    assert checks_for(config, "free", "abc123", None) == []
    assert checks_for(config, "nope", None, None) == []


def test_reset_anchor(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", None, None)
    add_row(db, clock.now - timedelta(minutes=5), "premium", 990)
    assert not ledger.admit(checks, 100).admitted
    other = Ledger(ledger.path, config, clock=clock)  # e.g. the CLI in another process
    other.add_reset("premium")
    other.close()
    clock.now += timedelta(seconds=1)
    assert ledger.admit(checks, 100).admitted
    status = {s.pool: s for s in ledger.status() if s.key_id is None}
    assert status["premium"].used == 0 and status["premium"].reserved == 100


def test_two_ledgers_share_counts(setup):
    config, db, clock, ledger = setup
    other = Ledger(ledger.path, config, clock=clock, owner="other")
    checks = checks_for(config, "premium", None, None)
    assert ledger.admit(checks, 600).admitted
    assert not other.admit(checks, 600).admitted  # sees the first one's reservation
    assert other.admit(checks, 400).admitted
    other.close()


def test_stale_reservations_expire(setup, monkeypatch):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", None, None)
    crashed = Ledger(ledger.path, config, clock=clock, owner="crashed")
    assert crashed.admit(checks, 900).admitted
    crashed.close()  # never settles: a kill -9
    assert not ledger.admit(checks, 200).admitted
    import addon.ledger.reservations as reservations

    real_time = reservations.time.time
    monkeypatch.setattr(reservations.time, "time", lambda: real_time() + reservations.RESERVATION_TTL + 1)
    assert ledger.admit(checks, 200).admitted
    ledger.heartbeat()
    owners = [r[0] for r in db.execute("select owner from reservations")]
    assert owners and not any(owner.startswith("crashed") for owner in owners)


def test_write_pools_publishes_current_window(setup):
    config, db, clock, _ = setup
    write_pools(db, config, clock.now)
    pools = {r["name"]: r for r in db.table("pools").rows}
    assert pools["premium"]["limit"] == 1000 and pools["free"]["limit"] is None
    assert pools["hourly"]["rolling_hours"] == 2
    now = iso_utc(clock.now)
    current = db.execute(
        "select start, end from pool_windows where pool = 'premium' and start <= ? and ? < end", [now, now]
    ).fetchall()
    assert current == [("2026-11-21T23:00:00.000Z", "2026-11-22T23:00:00.000Z")]


def test_check_scope_names():
    pool = config_mod.Pool("p", (), Window.parse("day"), 10)
    assert Check(pool, 10).scope == "p" and Check(pool, 5, "k").scope == "p for key k"


def test_ledger_follows_a_moved_database(setup, tmp_path):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", None, None)
    add_row(db, clock.now, "premium", 950)
    assert not ledger.admit(checks, 100).admitted
    db.conn.close()
    (tmp_path / "usage.db").rename(tmp_path / "old.db")
    # Missing: the ledger does not create it (the writer does); admission fails.
    with pytest.raises(sqlite3.OperationalError):
        ledger.admit(checks, 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"usage.db{suffix}").unlink(missing_ok=True)
    fresh = schema.connect(tmp_path / "usage.db")
    schema.migrate(fresh)
    assert ledger.admit(checks, 100).admitted  # the new file: nothing used yet
    assert fresh.execute("select count(*) from reservations").fetchone()[0] == 1


def test_admissions_decided_together_see_each_other(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", None, None)
    add_row(db, clock.now, "premium", 400)
    decisions = ledger.admit_many([(checks, 300), (checks, 250), (checks, 250), (checks, 40)])
    assert [d.admitted for d in decisions] == [True, True, False, True]
    assert decisions[2].used == 400 and decisions[2].reserved == 550
    assert db.execute("select sum(tokens) from reservations").fetchone()[0] == 590


# -- leases ----------------------------------------------------------------


def reserved_in_db(db) -> int:
    return db.execute("select coalesce(sum(tokens), 0) from reservations").fetchone()[0]


def test_far_from_the_limit_a_lease_admits_in_memory(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "big", None, None)
    assert ledger.admit_local(checks, 1000) is None  # no lease yet
    first = ledger.admit(checks, 1000)
    # The estimate plus spare: 1/64 of the limit (less than 1/16 of what is left).
    assert first.admitted and reserved_in_db(db) == 1000 + 15_625
    local = [ledger.admit_local(checks, 1000) for _ in range(16)]
    assert all(d is not None and d.reservation == first.reservation for d in local[:15]) and local[15] is None
    assert reserved_in_db(db) == 1000 + 15_625  # no transaction for those
    # Each row takes its estimate off the lease as it lands.
    add_row(db, clock.now, "big", 700, reservation=(first.reservation, 1000, first.owner))
    assert reserved_in_db(db) == 15_625
    status = {s.pool: s for s in ledger.status() if s.key_id is None}
    # Reserved: the 15 requests in flight; the rest of the lease is spare, held for no request.
    assert status["big"].used == 700 and status["big"].reserved == 15_000 and status["big"].held == 625


def test_near_the_limit_every_request_is_decided_in_the_database(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "big", None, None)
    add_row(db, clock.now, "big", 990_000)
    assert ledger.admit(checks, 1000).admitted
    assert reserved_in_db(db) == 1000  # 1/16 of the 9,000 left is less than one request: no spare
    assert ledger.admit_local(checks, 1000) is None


def test_a_refusal_gives_spare_tokens_back(setup):
    config, db, clock, ledger = setup
    other = Ledger(ledger.path, config, clock=clock, owner="other")
    checks = checks_for(config, "big", None, None)
    assert ledger.admit(checks, 1000).admitted and reserved_in_db(db) == 16_625
    add_row(db, clock.now, "big", 1_000_000 - 16_625 - 500)  # another process used the rest
    refused = ledger.admit(checks, 20_000)  # more than the spare plus what is left
    assert not refused.admitted and refused.reserved == 1000  # the spare is not held against us
    assert reserved_in_db(db) == 1000  # only the request in flight keeps its reservation
    assert other.admit(checks, 1500).admitted  # the spare went to whoever asked next
    other.close()


def test_other_processes_see_the_lease_as_reserved(setup):
    config, db, clock, ledger = setup
    other = Ledger(ledger.path, config, clock=clock, owner="other")
    checks = checks_for(config, "big", None, None)
    add_row(db, clock.now, "big", 900_000)
    assert ledger.admit(checks, 1000).admitted
    spare = reserved_in_db(db) - 1000
    assert spare == (1_000_000 - 900_000 - 1000) // 16  # less than 1/64 of the limit
    refused = other.admit(checks, 1_000_000 - 900_000 - 1000 - spare + 1)
    # In flight: the request; the spare is held for the other process's next requests.
    assert not refused.admitted and refused.reserved == 1000 and refused.held == spare
    other.close()


def test_idle_spare_goes_back_and_a_stop_removes_the_lease(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "big", None, None)
    first = ledger.admit(checks, 1000)
    ledger.release_idle(idle=3600)  # used just now: kept
    assert reserved_in_db(db) == 16_625
    ledger.release_idle(idle=0)
    assert reserved_in_db(db) == 1000 and ledger.admit_local(checks, 1) is None
    # A request admitted from the lease that will never be recorded gives its share back.
    assert ledger.admit(checks, 1000).admitted
    local = ledger.admit_local(checks, 5000)
    assert local is not None
    ledger.give_back(local.reservation, 5000, local.owner)
    assert ledger.admit_local(checks, 15_625) is not None
    add_row(db, clock.now, "big", 900, reservation=(first.reservation, 1000, first.owner))
    ledger.release_all()
    assert db.execute("select count(*) from reservations").fetchone()[0] == 0


def test_a_key_lease_counts_for_the_key_and_the_pool(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", "abc123", None)
    assert ledger.admit(checks, 200).admitted
    rows = db.execute("select pool, key_id, tokens from reservations").fetchall()
    assert rows == [("premium", "abc123", 200)]
    refused = ledger.admit(checks, 101)  # the key's 300
    assert not refused.admitted and refused.check.key_id == "abc123" and refused.reserved == 200
    assert not ledger.admit(checks_for(config, "premium", "zzz", None), 801).admitted  # the pool's 1000


def test_an_expired_lease_is_replaced(setup, monkeypatch):
    config, db, clock, ledger = setup
    checks = checks_for(config, "big", None, None)
    first = ledger.admit(checks, 1000)
    db.execute("delete from reservations")  # as another process's heartbeat does after a long suspension
    db.conn.commit()
    second = ledger.admit(checks, 1000)  # a transaction notices
    assert second.admitted and first.admitted
    assert second.reservation == first.reservation and second.owner != first.owner  # SQLite reused the id
    assert db.execute("select tokens, owner from reservations").fetchall() == [(1000 + 15_625, second.owner)]
    # A late row of the first lease must not take its tokens off the second one.
    add_row(db, clock.now, "big", 900, reservation=(first.reservation, 1000, first.owner))
    assert reserved_in_db(db) == 1000 + 15_625


def test_leases_never_admit_past_the_limit(setup):
    """Two processes, random requests that finish and whose rows land at
    random times: the tokens promised (rows landed, used by finished requests
    whose rows are on their way, estimates of requests in flight) never
    exceed the limit."""
    import random

    config, db, clock, ledger = setup
    other = Ledger(ledger.path, config, clock=clock, owner="other")
    checks = checks_for(config, "big", None, None)
    rng = random.Random(7)
    in_flight: list[tuple[Ledger, int, int, str]] = []  # (process, reservation, estimate, owner)
    finished: list[tuple[int, int, str, int]] = []  # (reservation, tokens held, owner, tokens used)
    landed = refused = 0

    def promised() -> int:
        return landed + sum(f[3] for f in finished) + sum(f[2] for f in in_flight)

    while refused < 50:
        step = rng.random()
        if in_flight and step < 0.3:
            process, reservation, estimate, owner = in_flight.pop(rng.randrange(len(in_flight)))
            tokens = rng.randint(estimate // 2, estimate)  # the real usage, at most the estimate
            finished.append((reservation, process.settle(reservation, owner, estimate, tokens), owner, tokens))
        elif finished and step < 0.5:
            reservation, held, owner, tokens = finished.pop(rng.randrange(len(finished)))
            add_row(db, clock.now, "big", tokens, reservation=(reservation, held, owner))
            landed += tokens
        else:
            process = rng.choice((ledger, other))
            estimate = rng.randint(500, 30_000)
            decision = process.admit_local(checks, estimate) or process.admit(checks, estimate)
            if decision.admitted:
                in_flight.append((process, decision.reservation, estimate, decision.owner))
            else:
                refused += 1
        assert promised() <= 1_000_000
    assert promised() > 1_000_000 - 2 * 30_000  # and the pool did fill up
    other.close()


def test_own_spare_tokens_in_other_scopes_are_not_held_against_this_process(setup):
    config, db, clock, ledger = setup
    key_checks = checks_for(config, "big", "k1", None)
    assert ledger.admit(key_checks, 1000).admitted  # a key's lease, with spare
    assert reserved_in_db(db) == 1000 + 15_625
    # A pool-wide request that fits only once that spare goes back: it does,
    # and the key's lease cannot promise it a second time.
    big = ledger.admit(checks_for(config, "big", None, None), 1_000_000 - 1000 - 10_000)
    assert big.admitted
    assert ledger.admit_local(key_checks, 1000) is None
    assert reserved_in_db(db) <= 1_000_000


def test_a_vanished_lease_is_noticed_by_the_heartbeat(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "big", None, None)
    assert ledger.admit(checks, 1000).admitted
    assert ledger.admit_local(checks, 1000) is not None
    db.execute("delete from reservations")  # expired during a suspension and removed by another process
    db.conn.commit()
    ledger.heartbeat()
    assert ledger.admit_local(checks, 1000) is None  # its spare is not reserved any more


def test_writer_keeps_reservations_of_rows_it_has_to_clean(setup, tmp_path):
    """A row SQLite refuses as it is (a lone surrogate) is cleaned and written,
    and its estimate still leaves the lease."""
    config, db, clock, ledger = setup
    first = ledger.admit(checks_for(config, "big", None, None), 1000)
    writer = Writer(ledger.path)
    try:
        writer.put({"ts": iso_utc(clock.now), "pool": "big", "total_tokens": 10, "outcome": "ok",
                    "user_agent": "bad \udcff agent",
                    "_reservation": inserts.Reservation(first.reservation, 1000, first.owner)})
        assert writer.flush()
    finally:
        writer.close()
    assert writer.rejected == 0 and writer.written == 1
    assert reserved_in_db(db) == 15_625


def test_rows_the_writer_drops_give_their_estimate_back(setup, tmp_path):
    config, db, clock, ledger = setup
    checks = checks_for(config, "big", None, None)
    first = ledger.admit(checks, 1000)
    local = [ledger.admit_local(checks, 1000) for _ in range(5)]
    assert ledger.admit_local(checks, 15_625 - 5000 + 1) is None
    dropped: list[dict] = []

    def give_back(rows):
        dropped.extend(rows)
        for row in rows:
            held = row["_reservation"]
            ledger.give_back(held.id, held.tokens, held.owner)

    # A directory that does not exist: rows wait in a spool of 2; the rest are dropped.
    writer = Writer(tmp_path / "missing" / "usage.db", spool_limit=2, on_drop=give_back)
    try:
        for decision in [first, *local]:
            writer.put({"ts": iso_utc(clock.now), "pool": "big", "total_tokens": 10, "outcome": "ok",
                        "_reservation": inserts.Reservation(decision.reservation, 1000, decision.owner)})
        writer.flush()
    finally:
        writer.close()
    assert len(dropped) == 4 and writer.dropped == 4
    assert ledger.admit_local(checks, 15_625 - 5000 + 4000) is not None  # the four estimates are spare again


def test_a_finished_request_settles_its_unused_estimate(setup):
    config, db, clock, ledger = setup
    # Far from the limit: what the estimate had too many is spare at once,
    # up to the spare the last decision allowed.
    big = checks_for(config, "big", None, None)
    first = ledger.admit(big, 1000)
    assert ledger.admit_local(big, 15_625) is not None  # all the spare promised
    assert ledger.settle(first.reservation, first.owner, 1000, 400) == 400  # it used 400
    assert ledger.admit_local(big, 600) is not None  # the 600 it did not use, before its row lands
    add_row(db, clock.now, "big", 400, reservation=(first.reservation, 400, first.owner))
    assert db.execute("select tokens from reservations where pool = 'big'").fetchone()[0] == 15_625 + 600
    assert ledger.settle(first.reservation, "someone else", 100, 0) == 100


def test_usage_beyond_the_estimate_counts_at_once(setup):
    """A request that used more than its estimate: the difference is held by
    the lease from its end (its spare pays first, the rest is added to the row
    in the next transaction), before its row lands; the row then takes it all."""
    config, db, clock, ledger = setup
    other = Ledger(ledger.path, config, clock=clock, owner="other")
    premium = checks_for(config, "premium", None, None)  # 1000: no spare
    first = ledger.admit(premium, 300)
    assert ledger.settle(first.reservation, first.owner, 300, 800) == 800  # used 500 more
    assert ledger.has_debt()
    ledger.release_idle()  # what Limits runs at once on the ledger thread
    assert not ledger.has_debt()
    assert reserved_in_db(db) == 800
    # Another process sees it before the row lands: 800 of 1000 are taken.
    refused = other.admit(premium, 300)
    assert not refused.admitted and refused.reserved == 800
    add_row(db, clock.now, "premium", 800, reservation=(first.reservation, 800, first.owner))
    ledger.landed(first.reservation, first.owner, 800)
    assert reserved_in_db(db) == 0
    refused = other.admit(premium, 300)
    assert not refused.admitted and (refused.used, refused.reserved) == (800, 0)
    other.close()


def test_usage_beyond_estimates_that_crosses_the_limit_gives_up_the_spare(setup):
    config, db, clock, ledger = setup
    big = checks_for(config, "big", None, None)
    add_row(db, clock.now, "big", 900_000)
    first = ledger.admit(big, 1000)
    spare = reserved_in_db(db) - 1000
    assert spare > 1000 and ledger.admit_local(big, 1000) is not None
    # It used 100,000 tokens: far past what was left.
    ledger.settle(first.reservation, first.owner, 1000, 100_000)
    assert ledger.admit_local(big, 1) is None  # nothing more from memory
    ledger.release_idle()
    assert not ledger.admit(big, 1).admitted


def test_a_lease_gives_up_its_spare_when_another_process_crossed_the_limit(setup):
    config, db, clock, ledger = setup
    big = checks_for(config, "big", None, None)
    add_row(db, clock.now, "big", 900_000)
    assert ledger.admit(big, 1000).admitted
    assert ledger.admit_local(big, 1000) is not None
    add_row(db, clock.now, "big", 99_000)  # another process's request used far more than its estimate
    ledger.give_up_crossed()  # the tick
    assert ledger.admit_local(big, 1000) is None


def test_a_request_larger_than_the_whole_limit_never_fits(setup):
    config, db, clock, ledger = setup
    premium = checks_for(config, "premium", None, None)
    decision = ledger.admit(premium, 1001)
    assert not decision.admitted and decision.reason == "never"
    message = refusal_message(decision, clock.now)
    assert "needs about 1,001 tokens, more than the whole daily limit of pool 'premium' (1,000 tokens)" in message
    assert "resets" not in message
    assert reserved_in_db(db) == 0
    alice = checks_for(config, "premium", "abc123", None)  # the key's own limit, 300
    assert never_fits(alice, 301) is alice[1] and never_fits(alice, 300) is None


def test_refusal_states_what_is_used_in_flight_and_held(setup):
    config, db, clock, ledger = setup
    checks = checks_for(config, "premium", "abc123", None)  # alice: 300 of the pool's 1000
    refused = ledger.admit(checks, 299)
    assert refused.admitted
    add_row(db, clock.now, "premium", 120, key_id="abc123",
            reservation=(refused.reservation, 299, refused.owner))
    decision = ledger.admit(checks, 200)
    assert not decision.admitted
    message = refusal_message(decision, clock.now)
    # Nothing in flight: no "reserved" figure at all.
    assert "120 of its daily 300 tokens used; this request needs about 200" in message


def test_near_the_limit_unused_estimates_go_back_to_the_pool(setup):
    """No hoarding: a process near the limit keeps no spare, so what its
    requests did not use goes back to every process at its next transaction
    (the tick, within a second)."""
    config, db, clock, ledger = setup
    other = Ledger(ledger.path, config, clock=clock, owner="other")
    checks = checks_for(config, "premium", None, None)  # 1000: too small for spare
    decisions = [ledger.admit(checks, 300) for _ in range(3)]
    for decision in decisions:
        held = ledger.settle(decision.reservation, decision.owner, 300, 50)
        add_row(db, clock.now, "premium", 50, reservation=(decision.reservation, held, decision.owner))
    assert ledger.admit_local(checks, 1) is None
    assert not other.admit(checks, 300).admitted  # 150 used, 750 still reserved
    ledger.release_idle()  # the tick
    assert db.execute("select sum(tokens) from reservations where pool = 'premium'").fetchone()[0] == 0
    assert other.admit(checks, 300).admitted
    other.close()
