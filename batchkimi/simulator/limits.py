"""The simulator's per-key limits: requests and tokens over a sliding minute, and concurrency.

A request is admitted when, over the last 60 seconds, fewer than ``rpm`` requests were
admitted and the tokens counted (prompts when admitted, completions when answered) plus this
prompt stay within ``tpm``; and fewer than ``concurrency`` requests are in flight.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass
class KeyWindow:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    in_flight: int = 0

    def expire(self, now: float, window_s: float = WINDOW_S) -> None:
        edge = now - window_s
        while self.requests and self.requests[0] <= edge:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= edge:
            self.token_sum -= self.tokens.popleft()[1]


class KeyLimits:
    def __init__(self, rpm: int = 0, tpm: int = 0, concurrency: int = 0, clock: object = None, window_s: float = WINDOW_S) -> None:
        self.rpm, self.tpm, self.concurrency = rpm, tpm, concurrency
        self.window_s = window_s  # 60 s like TokenHub; shorter only to rehearse quickly
        self._now = clock or time.monotonic
        self._keys: dict[str, KeyWindow] = {}

    def admit(self, key: str, prompt_tokens: int) -> tuple[str, float] | None:
        """None when admitted (the caller must :meth:`done` later), else (dimension, retry_after_s)."""
        now = self._now()  # type: ignore[operator]
        w = self._keys.setdefault(key, KeyWindow())
        w.expire(now, self.window_s)
        if self.concurrency and w.in_flight >= self.concurrency:
            return "concurrency", 1.0
        if self.rpm and len(w.requests) >= self.rpm:
            return "rpm", max(1.0, math.ceil(w.requests[0] + self.window_s - now))
        if self.tpm and w.token_sum + prompt_tokens > self.tpm:
            wait = w.tokens[0][0] + self.window_s - now if w.tokens else 1.0
            return "tpm", max(1.0, math.ceil(wait))
        w.requests.append(now)
        if prompt_tokens:
            w.tokens.append((now, prompt_tokens))
            w.token_sum += prompt_tokens
        w.in_flight += 1
        return None

    def done(self, key: str, completion_tokens: int) -> None:
        w = self._keys[key]
        w.in_flight -= 1
        if completion_tokens:
            w.tokens.append((self._now(), completion_tokens))  # type: ignore[operator]
            w.token_sum += completion_tokens
