"""Which pool a model counts against: exact names, dated snapshots, globs."""

from __future__ import annotations

import pytest

from addon import config
from addon.metering.pools import PoolMatcher, match_score


@pytest.fixture(scope="module")
def default() -> PoolMatcher:
    return PoolMatcher(config.load())


@pytest.mark.parametrize(
    "model, pool",
    [
        ("gpt-4o-mini-2024-07-18", "mini"),
        ("gpt-4o-2024-08-06", "premium"),
        ("gpt-4o", "premium"),
        ("gpt-4o-mini", "mini"),
        ("gpt-5-2025-08-07", "premium"),
        ("gpt-5-mini-2025-08-07", "mini"),
        ("gpt-5-nano", "mini"),
        ("gpt-4.1-2025-04-14", "premium"),
        ("gpt-4.1-mini-2025-04-14", "mini"),
        ("o3", "premium"),
        ("o3-mini-2025-01-31", "mini"),
        ("o1-preview", "premium"),
        ("o4-mini", "mini"),
        ("codex-mini-latest", "mini"),
        ("gpt-5.1-codex-mini", "mini"),
        ("gpt-5.1-codex", "premium"),
        ("text-embedding-3-small", "other"),
        ("whisper-1", "other"),
        ("gpt-image-1", "other"),
        ("gpt-4o-mini-transcribe", "other"),
        ("gpt-4o-mini-tts", "other"),
        ("dall-e-3", "other"),
        ("ft:gpt-4o-mini-2024-07-18:org::abc123", "other"),
        # Unknown models count against default_pool (premium in the bundled config).
        ("gpt-4o-audio-preview", "premium"),
        ("some-new-model", "premium"),
        ("", "premium"),
        (None, "premium"),
    ],
)
def test_bundled_pools(default, model, pool):
    assert default.pool_for(model) == pool


def test_a_longer_name_is_not_a_snapshot():
    assert match_score("gpt-4o-mini", "gpt-4o") == 0
    assert match_score("gpt-4o-mini-2024-07-18", "gpt-4o") == 0
    assert match_score("gpt-4o-latest", "gpt-4o") == 0
    assert match_score("gpt-4-0613", "gpt-4") > 0
    assert match_score("gpt-4o-20240806", "gpt-4o") > 0


def test_most_specific_match_wins():
    cfg = config.parse(
        """
default_pool = "fallback"
[pools.fallback]
models = []
[pools.globbed]
models = ["gpt-*"]
[pools.narrow_glob]
models = ["gpt-4o-*"]
[pools.snapshot]
models = ["gpt-4o"]
[pools.exact]
models = ["gpt-4o-2024-08-06"]
"""
    )
    matcher = PoolMatcher(cfg)
    assert matcher.pool_for("gpt-4o-2024-08-06") == "exact"
    assert matcher.pool_for("gpt-4o-2024-11-20") == "snapshot"
    assert matcher.pool_for("gpt-4o-mini") == "narrow_glob"
    assert matcher.pool_for("gpt-3.5-turbo") == "globbed"
    assert matcher.pool_for("o1") == "fallback"


def test_unknown_models_go_to_the_configured_default_pool():
    cfg = config.parse('default_pool = "b"\n[pools.a]\nmodels = ["x"]\n[pools.b]\nmodels = ["y"]\n')
    assert PoolMatcher(cfg).pool_for("z") == "b"
    assert PoolMatcher(cfg).pool_for("x-2025-01-01") == "a"
