"""A cheap token estimate, shared by the client (to reserve TPM quota and estimate cost) and
the simulator (to count usage). Kimi's tokenizer is not public; this errs a little high for
English (about 4 characters a token) and counts each CJK character as one token.

Images and videos (the same rules on both sides, so a rehearsal paces like the real thing):

- an image costs ``floor(w/14) * floor(h/14)`` tokens for the pixel size sent (Kimi's vision
  encoder reads 14x14-pixel tiles; Moonshot calls the count "dynamic" and publishes no formula,
  so this is an approximation: 512x512 is 1,296 tokens, 1024x1024 is 5,329);
- a video costs one token per KiB of file, at least 1,024: a stand-in for "more frames and
  more pixels cost more", since neither side decodes the video;
- an image or video sent by URL, whose size nobody here knows, costs a flat 1,024.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MESSAGE_OVERHEAD_TOKENS = 4
URL_MEDIA_TOKENS = 1024
TILE_PIXELS = 14
VIDEO_MIN_TOKENS = 1024


def image_tokens(width: int, height: int) -> int:
    return max(1, (width // TILE_PIXELS) * (height // TILE_PIXELS))


def video_tokens(size_bytes: int) -> int:
    return max(VIDEO_MIN_TOKENS, size_bytes // 1024)


def estimate_text_tokens(text: str) -> int:
    if not text:
        return 0
    if text.isascii():
        return (len(text) + 3) // 4
    ascii_chars = sum(1 for ch in text if ch < "\u0080")
    return (ascii_chars + 3) // 4 + (len(text) - ascii_chars)


def _flat(part: dict[str, Any]) -> int:
    return URL_MEDIA_TOKENS


def estimate_content_tokens(content: Any, media_tokens: Callable[[dict[str, Any]], int] = _flat) -> int:
    """Tokens of a message's content; ``media_tokens`` prices an image or video part."""
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                total += estimate_text_tokens(str(part.get("text", "")))
            else:
                total += media_tokens(part)
        return total
    return 0


def estimate_messages_tokens(messages: list[dict[str, Any]], media_tokens: Callable[[dict[str, Any]], int] = _flat, *,
                             history_reasoning: bool = True) -> int:
    """The prompt tokens of ``messages``. ``history_reasoning``: whether the reasoning written
    back in assistant turns is part of the prompt (Kimi passes it to the model, and bills it,
    only with ``thinking.keep = "all"``)."""
    total = 0
    for m in messages:
        total += MESSAGE_OVERHEAD_TOKENS + estimate_content_tokens(m.get("content"), media_tokens)
        if history_reasoning and m.get("reasoning_content"):
            total += estimate_text_tokens(str(m["reasoning_content"]))
        for call in m.get("tool_calls") or ():
            fn = (call.get("function") or {}) if isinstance(call, dict) else {}
            total += estimate_text_tokens(str(fn.get("name", ""))) + estimate_text_tokens(str(fn.get("arguments", "")))
    return total
