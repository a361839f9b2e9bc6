"""Prompt caching, as a cache would: the longest prefix of a prompt that the same key (and the
same ``prompt_cache_key``, when the request names one) sent before counts as cached tokens.

A prefix is matched two ways, and the longer wins: whole messages (a conversation's history),
and, inside the prompt's text, whole blocks of ``block_tokens`` tokens (a long instruction
shared by single-message prompts). Kimi's own block size is not published: it is a setting.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from ..tokens import estimate_messages_tokens

MAX_ENTRIES = 200_000  # per namespace: a cache that stops learning, never one that grows forever


def namespace(key: str, body: dict[str, Any]) -> str:
    """Whose cache a request reads: its API key's, and within it its ``prompt_cache_key``'s."""
    pck = body.get("prompt_cache_key")
    return f"{key}\0{pck}" if isinstance(pck, str) and pck else key


def _remember(cache: dict[bytes, int], digest: bytes, value: int) -> bool:
    if digest in cache:
        return True
    if len(cache) < MAX_ENTRIES:
        cache[digest] = value
    return False


def cached_tokens(caches: dict[str, dict[bytes, int]], space: str, messages: list[dict[str, Any]], prompt_tokens: int,
                  block_tokens: int = 64, *, history_reasoning: bool = False) -> int:
    """Tokens of the longest prefix of ``messages`` this namespace sent before (at most
    ``prompt_tokens``); remembers this prompt's prefixes for the next request."""
    cache = caches[space]
    # whole messages, all but the last
    h = hashlib.blake2b(digest_size=8, person=b"messages")
    cached = total = 0
    for m in messages[:-1]:
        h.update(orjson.dumps(m, option=orjson.OPT_SORT_KEYS))
        total += estimate_messages_tokens([m], history_reasoning=history_reasoning)
        if _remember(cache, h.copy().digest(), total):
            cached = total
    # blocks of the prompt's text: a shared start inside one message counts too
    text = b"".join(orjson.dumps([m.get("role"), m.get("content"), m.get("tool_calls")], option=orjson.OPT_SORT_KEYS)
                    for m in messages)
    step = max(1, block_tokens) * 4  # bytes a block (4 characters a token)
    h = hashlib.blake2b(digest_size=8, person=b"blocks")
    blocks = 0
    for n, end in enumerate(range(step, len(text) + 1, step), start=1):
        h.update(text[end - step:end])
        if _remember(cache, h.copy().digest(), n):
            blocks = n
    return min(prompt_tokens, max(cached, blocks * max(1, block_tokens)))
