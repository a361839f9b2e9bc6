"""A cheap token estimate, shared by the client (to reserve TPM quota and estimate cost) and
the simulator (to count usage). Kimi's tokenizer is not public; this errs a little high for
English (about 4 characters a token) and counts each CJK character as one token.
"""

from __future__ import annotations

from typing import Any

MESSAGE_OVERHEAD_TOKENS = 4


def estimate_text_tokens(text: str) -> int:
    if not text:
        return 0
    if text.isascii():
        return (len(text) + 3) // 4
    ascii_chars = sum(1 for ch in text if ch < "\u0080")
    return (ascii_chars + 3) // 4 + (len(text) - ascii_chars)


def estimate_content_tokens(content: Any) -> int:
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
                total += 1024  # an image or video: its real cost depends on its size
        return total
    return 0


def estimate_messages_tokens(messages: list[dict[str, Any]]) -> int:
    total = 0
    for m in messages:
        total += MESSAGE_OVERHEAD_TOKENS + estimate_content_tokens(m.get("content"))
        if m.get("reasoning_content"):
            total += estimate_text_tokens(str(m["reasoning_content"]))
        for call in m.get("tool_calls") or ():
            fn = (call.get("function") or {}) if isinstance(call, dict) else {}
            total += estimate_text_tokens(str(fn.get("name", ""))) + estimate_text_tokens(str(fn.get("arguments", "")))
    return total
