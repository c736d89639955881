"""Session affinity (``routing.affinity: session``): send a conversation back to the
backend that served it before, where its prompt is likely still in the KV cache.

A conversation is named by ``X-Session-ID`` when the client sends one; otherwise by
its model and opening (the system prompt and first user message of a chat, the start
of a prompt) — that opening is exactly the prefix a backend can reuse. The router
honours the affinity only while that backend is at most half busy, so a popular
conversation cannot pile work onto one GPU while another idles.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from multidict import MultiMapping

_OPENING_CHARS = 512


def session_key(model: str, data: dict[str, Any], headers: MultiMapping[str]) -> str | None:
    explicit = headers.get("X-Session-ID")
    if explicit:
        return f"id:{explicit}"
    messages = data.get("messages")
    if isinstance(messages, list) and messages:
        opening = [m.get("content") for m in messages[:2] if isinstance(m, dict)]
        text = "\x00".join(c for c in opening if isinstance(c, str))
    else:
        prompt = data.get("prompt") or data.get("system")
        text = prompt if isinstance(prompt, str) else ""
    if not text:
        return None
    digest = hashlib.blake2b(f"{model}\x00{text[:_OPENING_CHARS]}".encode(),
                             digest_size=12).hexdigest()
    return f"open:{digest}"


class Affinity:
    """Conversation → backend name, the most recent ``size`` conversations."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._map: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str | None) -> str | None:
        return self._map.get(key) if key is not None else None

    def remember(self, key: str | None, backend: str) -> None:
        if key is None:
            return
        self._map[key] = backend
        self._map.move_to_end(key)
        if len(self._map) > self.size:
            self._map.popitem(last=False)
