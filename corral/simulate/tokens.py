"""Deterministic fake tokens: text, counts and embedding vectors.

Everything is a pure function of the request so tests (and gateway caches)
can predict it; one whitespace-separated word counts as one token.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from corral.simulate.models import EMBED_DIM

WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog",
    "while", "llamas", "graze", "in", "green", "fields", "under", "bright", "sky",
    "and", "every", "answer", "is", "simulated", "here",
)  # fmt: skip

# Tokens a chat template adds around each message (role header, separators).
CHAT_TOKENS_PER_MESSAGE = 4


def count_text(text: str) -> int:
    return len(text.split())


def count_prompt(prompt: str, system: str = "") -> int:
    """prompt_eval_count of a generate request; at least 1, as a BOS is always fed."""
    return max(1, count_text(prompt) + count_text(system))


def count_messages(messages: Iterable[Mapping[str, Any]]) -> int:
    """prompt_eval_count of a chat request: words plus template overhead per message."""
    total = 0
    for m in messages:
        content = m.get("content")
        total += CHAT_TOKENS_PER_MESSAGE + (count_text(content) if isinstance(content, str) else 0)
    return max(1, total)


def seed_of(text: str) -> int:
    # crc32 is C-fast; the seed only picks where the word cycle starts.
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def words(seed: int, n: int) -> list[str]:
    """n tokens as they would stream: first bare, the rest with a leading space."""
    if n <= 0:
        return []
    k = len(WORDS)
    start = seed % k
    first = WORDS[start].capitalize()
    return [first, *(" " + WORDS[(start + i) % k] for i in range(1, n))]


def context_ids(seed: int, prompt_tokens: int, generated: int) -> list[int]:
    """Stand-in for the deprecated ``context`` token ids of /api/generate."""
    base = seed % 100_000
    return [base + i for i in range(prompt_tokens + generated)]


def raw_vector(text: str) -> list[float]:
    """Deterministic un-normalised vector (what legacy /api/embeddings returns)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=EMBED_DIM).digest()
    # Map bytes to [-1, 1); never all zero because of the +0.5 offset.
    return [(b + 0.5) / 128.0 - 1.0 for b in digest]


def unit_vector(text: str, dimensions: int | None = None) -> list[float]:
    """L2-normalised vector as /api/embed returns, optionally truncated first."""
    v = raw_vector(text)
    if dimensions is not None and 0 < dimensions < len(v):
        v = v[:dimensions]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]
