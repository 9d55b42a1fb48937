"""Which pool a model belongs to.

A model matches a pattern when it equals it, or is it plus a dated snapshot
suffix (`gpt-4o-2024-08-06` is `gpt-4o`, `gpt-4o-mini` is not), or matches
it as a `*` glob. The most specific match wins: exact, then snapshot, then
the longest glob.
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache

from addon.config import Config

_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4}|\d{8})$")


def match_score(model: str, pattern: str) -> int:
    """0 for no match; higher is more specific."""
    if model == pattern:
        return 3_000_000
    if model.startswith(pattern) and _SNAPSHOT.fullmatch(model[len(pattern):]):
        return 2_000_000 + len(pattern)
    if "*" in pattern and fnmatch.fnmatchcase(model, pattern):
        return 1_000_000 + len(pattern.replace("*", ""))
    return 0


class PoolMatcher:
    def __init__(self, config: Config) -> None:
        self.default_pool = config.default_pool
        self._patterns = [(pool.name, pattern) for pool in config.pools.values() for pattern in pool.models]
        self.pool_for = lru_cache(maxsize=4096)(self._pool_for)

    def _pool_for(self, model: str | None) -> str:
        if not model:
            return self.default_pool
        model = model.strip()
        # "ft:gpt-4o-mini:org::id" is matched as-is (the bundled config has ft:*).
        best, best_score = self.default_pool, 0
        for pool, pattern in self._patterns:
            score = match_score(model, pattern)
            if score > best_score:
                best, best_score = pool, score
        return best
