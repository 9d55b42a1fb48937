"""The pure admission policy (addon/ledger/policy.py): no database, no clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from addon import config as config_mod
from addon.ledger.policy import Check, Decision, checks_for, never_fits, refusal_message, seconds_until, window_phrase

CONFIG = config_mod.parse("""
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
[keys.abc123]
label = "alice"
limits = { premium = 300 }
""")
NOW = datetime(2026, 11, 22, 10, tzinfo=timezone.utc)


def test_checks_are_the_pool_limit_then_the_key_limit():
    pool, key = checks_for(CONFIG, "premium", "abc123", None)
    assert (pool.limit, pool.key_id, pool.scope) == (1000, None, "premium")
    assert (key.limit, key.key_id, key.scope) == (300, "abc123", "premium for key abc123")


def test_a_key_rule_named_by_the_call_label_applies_to_the_request_key():
    checks = checks_for(CONFIG, "premium", "sk-xyz", "abc123")
    assert [(c.limit, c.key_id) for c in checks] == [(1000, None), (300, "sk-xyz")]


def test_no_checks_without_a_limit_a_pool_or_a_key_id():
    assert checks_for(CONFIG, "free", "abc123", None) == []  # tracked only
    assert checks_for(CONFIG, "nope", None, None) == []
    assert checks_for(CONFIG, None, None, None) == []
    assert [c.key_id for c in checks_for(CONFIG, "premium", None, "abc123")] == [None]  # no key to count against


def test_never_fits_names_the_first_limit_smaller_than_the_estimate():
    checks = checks_for(CONFIG, "premium", "abc123", None)
    assert never_fits(checks, 300) is None
    assert never_fits(checks, 301) is checks[1]
    assert never_fits(checks, 1001) is checks[0]
    assert never_fits([], 10**9) is None


def test_seconds_until_rounds_up_and_is_at_least_one():
    assert seconds_until(NOW + timedelta(seconds=10, milliseconds=1), NOW) == 11
    assert seconds_until(NOW + timedelta(seconds=10), NOW) == 10
    assert seconds_until(NOW - timedelta(hours=1), NOW) == 1
    assert seconds_until(None, NOW) == 60  # rolling: no reset to wait for


def test_window_phrase():
    assert [window_phrase(w) for w in ("day", "week", "month", "rolling:24h")] == [
        "daily", "weekly", "monthly", "rolling 24h"]


def test_refusal_of_a_calendar_window_says_when_it_resets():
    check = checks_for(CONFIG, "premium", "abc123", None)[1]
    decision = Decision(False, None, check, used=250, reserved=40, estimate=60, resets_at=NOW + timedelta(hours=2),
                        reason="limit", held=7)
    assert refusal_message(decision, NOW) == (
        "Usage limit reached for pool 'premium' (key abc123): 250 of its daily 300 tokens used, "
        "40 reserved by requests in flight, 7 held by other proxies for their next requests; "
        "this request needs about 60. It resets at 2026-11-22T12:00:00Z (in 7200 s). "
        "Refused by the usage proxy before reaching OpenAI.")


def test_refusal_of_a_rolling_window_promises_no_reset():
    check = Check(CONFIG.pools["hourly"], 500)
    message = refusal_message(Decision(False, None, check, used=480, estimate=30, reason="limit"), NOW)
    assert "480 of its rolling 2h 500 tokens used; this request needs about 30." in message
    assert "reserved" not in message and "held" not in message
    assert "It is a rolling 2h window: capacity returns as older usage ages out." in message


def test_refusal_of_a_request_larger_than_the_limit_says_it_never_fits():
    check = Check(CONFIG.pools["premium"], 1000)
    message = refusal_message(Decision(False, None, check, estimate=5000, reason="never",
                                       resets_at=NOW + timedelta(hours=1)), NOW)
    assert message.startswith("This request needs about 5,000 tokens, more than the whole daily limit of "
                              "pool 'premium' (1,000 tokens): it can never be admitted.")
    assert "resets" not in message
