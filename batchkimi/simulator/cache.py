"""Prompt caching, as a cache would: a prefix of messages seen before from the same key counts
as cached tokens."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from ..tokens import estimate_messages_tokens


def cached_tokens(caches: dict[str, dict[bytes, int]], key: str, messages: list[dict[str, Any]]) -> int:
    """Tokens of the longest prefix of ``messages`` (all but the last) this key sent before."""
    cache = caches[key]
    h = hashlib.blake2b(digest_size=8)
    cached = total = 0
    for m in messages[:-1]:
        h.update(orjson.dumps(m, option=orjson.OPT_SORT_KEYS))
        total += estimate_messages_tokens([m])
        digest = h.copy().digest()
        if digest in cache:
            cached = total
        elif len(cache) < 100_000:
            cache[digest] = total
    return cached
