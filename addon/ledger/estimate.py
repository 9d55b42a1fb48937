"""How many tokens a request may cost, decided before it goes upstream.

One pure function, `estimate`, holds every rule (README: "How each request
is estimated"). It takes what the request says about itself (`RequestFacts`,
from an HTTP body or a WebSocket `response.create` message), the endpoint,
the configuration and, for a continuation, what the previous response used
as recorded on this database (`PreviousUsage`; looking it up is I/O and
belongs to the ledger thread, never to the event loop).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from addon.metering.wire import RequestFacts

# Inline images are counted at a flat rate rather than by their base64 size.
_DATA_URL = re.compile(rb"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")
IMAGE_TOKENS_ESTIMATE = 1000
BYTES_PER_TOKEN = 4
# Bodies smaller than this cannot hold an image worth scanning for.
IMAGE_SCAN_MIN = 20_000

# No output tokens: the whole cost is the input.
INPUT_ONLY_ENDPOINTS = frozenset({"embeddings", "moderations"})
# Requests that spend no tokens themselves but open a door to spending
# (a batch, an ephemeral Realtime key): they need a pool that is not spent.
DOOR_ENDPOINTS = frozenset({
    "batches", "realtime.client_secrets", "realtime.sessions", "realtime.transcription_sessions",
})
# Endpoints whose `n` asks for several answers, each billed its own output.
CHOICE_ENDPOINTS = frozenset({"chat.completions", "completions", "images.generations", "images.edits",
                              "images.variations"})


class EstimateSettings(Protocol):
    @property
    def estimate_output_tokens(self) -> int: ...  # output assumed when a request sets no cap

    @property
    def estimate_previous_tokens(self) -> int: ...  # context for a continuation whose previous response is unknown


@dataclass(frozen=True, slots=True)
class PreviousUsage:
    """What the response a continuation builds on used, as recorded."""

    input_tokens: int
    output_tokens: int

    @property
    def context(self) -> int:
        # The previous response's whole input and its output are the
        # continuation's input again (cached or not, they are counted).
        return self.input_tokens + self.output_tokens


def is_continuation(facts: RequestFacts) -> bool:
    return facts.previous_response_id is not None or facts.conversation is not None


def estimate(facts: RequestFacts, endpoint: str, settings: EstimateSettings, previous: PreviousUsage | None = None,
             body: bytes | None = None) -> int:
    """A cautious estimate of a request's tokens (input + output), at least 1.

    - input: ~4 bytes of the body per token (`facts.input_chars`); inline
      base64 images in `body` count IMAGE_TOKENS_ESTIMATE each instead;
    - continuation (`previous_response_id`, `conversation`): plus the
      previous response's input + output (`previous`), or
      `estimate_previous_tokens` when it is unknown;
    - output: the request's cap (`max_tokens`, `max_completion_tokens`,
      `max_output_tokens`) or `estimate_output_tokens`, times the answers
      generated (`n`, `best_of`); none for embeddings and moderations;
    - batches and Realtime client secrets / sessions: 1 (they must find
      their pool not spent; what they spend is counted later or elsewhere).
    """
    if endpoint in DOOR_ENDPOINTS:
        return 1
    size = facts.input_chars
    images = 0
    if body and len(body) > IMAGE_SCAN_MIN:
        for match in _DATA_URL.finditer(body):
            size -= match.end() - match.start()
            images += 1
    input_tokens = max(size, 0) // BYTES_PER_TOKEN + images * IMAGE_TOKENS_ESTIMATE
    if is_continuation(facts):
        input_tokens += previous.context if previous is not None else settings.estimate_previous_tokens
    if endpoint in INPUT_ONLY_ENDPOINTS:
        output = 0
    else:
        cap = facts.max_output_tokens if facts.max_output_tokens is not None else settings.estimate_output_tokens
        answers = max(facts.n, facts.best_of or 1) if endpoint in CHOICE_ENDPOINTS else 1
        output = cap * answers
    return max(input_tokens + output, 1)
