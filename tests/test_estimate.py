"""The estimation rules (addon/ledger/estimate.py), one by one."""

from __future__ import annotations

from addon import config as config_mod
from addon.ledger.estimate import PreviousUsage, estimate
from addon.metering.wire import RequestFacts, facts_from_request

CONFIG = config_mod.parse("""
estimate_output_tokens = 1000
estimate_previous_tokens = 5000
[pools.p]
limit = 10
models = ["gpt-4o"]
""")


def facts(body: dict, size: int = 400) -> RequestFacts:
    return facts_from_request(body, size)


def test_input_is_a_quarter_of_the_body_and_output_the_cap():
    assert estimate(facts({"max_tokens": 50}), "chat.completions", CONFIG) == 100 + 50
    assert estimate(facts({"max_completion_tokens": 60}), "chat.completions", CONFIG) == 160
    assert estimate(facts({"max_output_tokens": 70}), "responses", CONFIG) == 170


def test_no_cap_assumes_the_configured_output():
    assert estimate(facts({}), "chat.completions", CONFIG) == 100 + 1000
    assert estimate(facts({}), "responses", CONFIG) == 100 + 1000


def test_embeddings_and_moderations_have_no_output():
    assert estimate(facts({"max_tokens": 50}), "embeddings", CONFIG) == 100
    assert estimate(facts({}), "moderations", CONFIG) == 100


def test_each_of_n_answers_is_billed_its_own_output():
    assert estimate(facts({"n": 100, "max_tokens": 100}), "chat.completions", CONFIG) == 100 + 100 * 100
    assert estimate(facts({"n": 3}), "chat.completions", CONFIG) == 100 + 3 * 1000
    # best_of candidates are generated and billed (n <= best_of)
    assert estimate(facts({"best_of": 5, "n": 2, "max_tokens": 10}), "completions", CONFIG) == 100 + 50
    # n means nothing to the Responses API
    assert estimate(facts({"n": 9, "max_output_tokens": 10}), "responses", CONFIG) == 110


def test_a_continuation_adds_the_previous_context():
    request = facts({"previous_response_id": "resp_1", "max_output_tokens": 10})
    previous = PreviousUsage(input_tokens=3000, output_tokens=700)
    assert estimate(request, "responses", CONFIG, previous) == 100 + 3700 + 10
    # Unknown previous response: the configured assumption.
    assert estimate(request, "responses", CONFIG, None) == 100 + 5000 + 10
    conversation = facts({"conversation": {"id": "conv_1"}, "max_output_tokens": 10})
    assert conversation.conversation == "conv_1"
    assert estimate(conversation, "responses", CONFIG, previous) == 100 + 3700 + 10
    assert estimate(facts({"conversation": "conv_2"}), "responses", CONFIG, None) == 100 + 5000 + 1000


def test_inline_images_count_a_flat_rate():
    image = b'{"url": "data:image/png;base64,' + b"A" * 400_000 + b'"}'
    request = RequestFacts(input_chars=len(image), max_output_tokens=10)
    assert estimate(request, "chat.completions", CONFIG, None, image) == (len(image) - 400_022) // 4 + 1000 + 10


def test_doors_to_spending_need_only_a_pool_that_is_not_spent():
    for endpoint in ("batches", "realtime.client_secrets", "realtime.sessions", "realtime.transcription_sessions"):
        assert estimate(facts({"max_tokens": 5000}, 10_000), endpoint, CONFIG) == 1


def test_bad_values_are_ignored():
    assert estimate(facts({"n": "many", "best_of": True, "previous_response_id": 5}), "chat.completions",
                    CONFIG) == 1100
    assert estimate(RequestFacts(), "chat.completions", config_mod.parse(
        "estimate_output_tokens = 0\n[pools.p]\nmodels = []\n")) == 1
