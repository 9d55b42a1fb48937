"""Prices genai-prices does not carry: a small, dated, cited table.

genai-prices (pinned) is the source for every component it has; these
entries only fill what it lacks: hosted tool fees for models it does not
list them for, DALL-E per image, audio rates of the audio previews, the
Batch API rule, free moderation. The config's `[prices."model"]` overrides
every entry, per component.

Keys are genai-prices price keys (USD per million tokens for `*_mtok`, per
thousand calls for `*_kcount`, per million characters for `input_mchars`,
per hour of audio for `audio_hours`) plus three of ours: `container_each`
(USD per Code Interpreter container), `image_generation_kcount` (USD per
thousand image_generation tool calls) and `image_each` (USD per image,
keyed by "size/quality").

The figures were read from copies of OpenAI's pricing page: this machine
cannot reach it. Each entry names the page and when its figure was current.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

PRICING_PAGE = "https://platform.openai.com/docs/pricing"


@dataclass(frozen=True, slots=True)
class Entry:
    pattern: str  # model name, snapshot or glob, matched like [prices] overrides
    rates: dict[str, Decimal | dict[str, Decimal]]
    source: str
    as_of: str  # when the source said so
    free: bool = False
    note: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _d(value: str) -> Decimal:
    return Decimal(value)


# Fees of hosted tools in the Responses API, for every model (genai-prices
# has web and file search for some models only, code interpreter and image
# generation for none).
TOOL_FEES = Entry(
    pattern="*",
    rates={
        "web_searches_kcount": _d("10"),  # web_search: $10 / 1k calls (+ search content tokens as input)
        "storage_searches_kcount": _d("2.5"),  # file_search: $2.50 / 1k calls
        "container_each": _d("0.03"),  # code_interpreter: $0.03 per container (1 GB, the default)
    },
    source=PRICING_PAGE + "#built-in-tools",
    as_of="2026-03-12",
    note="image_generation calls are billed as image tokens of the image model, which the Responses usage does not"
    " report: no price here (cost_usd NULL unless [prices] sets image_generation).",
)

# DALL-E bills per image by size and quality (its answers carry no usage).
DALL_E = (
    Entry(
        pattern="dall-e-3",
        rates={"image_each": {
            "1024x1024/standard": _d("0.04"),
            "1024x1792/standard": _d("0.08"),
            "1792x1024/standard": _d("0.08"),
            "1024x1024/hd": _d("0.08"),
            "1024x1792/hd": _d("0.12"),
            "1792x1024/hd": _d("0.12"),
        }},
        source=PRICING_PAGE + "#image-generation",
        as_of="2026-03-12",
        extra={"default_size": "1024x1024", "default_quality": "standard"},
    ),
    Entry(
        pattern="dall-e-2",
        rates={"image_each": {
            "256x256/standard": _d("0.016"),
            "512x512/standard": _d("0.018"),
            "1024x1024/standard": _d("0.02"),
        }},
        source=PRICING_PAGE + "#image-generation",
        as_of="2026-03-12",
        extra={"default_size": "1024x1024", "default_quality": "standard"},
    ),
)

# Audio rates genai-prices lacks (it prices these models' audio as text).
AUDIO = (
    Entry(
        pattern="gpt-4o-audio-preview",
        rates={"input_audio_mtok": _d("40"), "output_audio_mtok": _d("80")},
        source=PRICING_PAGE + "#audio-tokens",
        as_of="2026-03-12",
    ),
    Entry(
        pattern="gpt-4o-audio-preview-2024-10-01",
        rates={"input_audio_mtok": _d("100"), "output_audio_mtok": _d("200")},
        source=PRICING_PAGE + "#audio-tokens",
        as_of="2024-10-01",
    ),
    Entry(
        pattern="gpt-4o-mini-audio-preview",
        rates={"input_audio_mtok": _d("10"), "output_audio_mtok": _d("20")},
        source=PRICING_PAGE + "#audio-tokens",
        as_of="2026-03-12",
    ),
)

# Moderation endpoints are free: a real 0.
MODERATION = Entry(pattern="*moderation*", rates={}, free=True, source=PRICING_PAGE + "#moderation",
                   as_of="2026-03-12")

# Batch API: 50 % of the standard price of inputs and outputs, where
# genai-prices has no batch price of its own for the model (or date).
BATCH_DISCOUNT = Decimal("0.5")
BATCH_SOURCE = ("https://platform.openai.com/docs/guides/batch", "2026-03-12")

ENTRIES: tuple[Entry, ...] = (TOOL_FEES, *DALL_E, *AUDIO, MODERATION)
