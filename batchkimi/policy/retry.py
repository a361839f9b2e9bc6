"""When to retry a failed attempt, and how long to wait. Pure; the clock and the random
source are injected.

The wait before attempt ``k + 1`` (``k`` attempts made so far) is, in order of preference:

1. the server's ``Retry-After`` (seconds, or an HTTP date), capped at ``max_retry_after_s``;
2. the "please try again after N seconds" hint in a Moonshot message;
3. full-jitter exponential backoff: ``uniform(0, min(backoff_max_s, backoff_base_s * 2**(k-1)))``.

Only errors marked ``retryable`` are retried (:func:`batchkimi.policy.disposition.classify`), and never past
``max_attempts`` attempts or ``max_retry_time_s`` seconds since the row's first attempt. A 2xx
reply whose answer cannot be used (``MALFORMED``) is tried again at most once: a server that
sends a malformed answer almost always sends it again, and every try is paid.
"""

from __future__ import annotations

import datetime
import email.utils
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import APIError

# A 2xx reply that was paid for but holds no usable answer: one more try, never more.
MALFORMED = frozenset({"bad_response", "bad_stream", "empty_answer"})
MALFORMED_MAX_ATTEMPTS = 2


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    max_retry_time_s: float = 1800.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 3600.0

    @classmethod
    def no_wait(cls, max_attempts: int = 6) -> RetryPolicy:
        """For tests: same decisions, zero backoff."""
        return cls(max_attempts=max_attempts, backoff_base_s=0.0, backoff_max_s=0.0)

    def backoff_s(self, attempts: int, rng: Callable[[], float] = random.random) -> float:
        """Full-jitter exponential backoff after ``attempts`` failed attempts (1-based)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempts - 1)))
        return ceiling * rng()

    def server_delay_s(self, error: APIError) -> float | None:
        """The delay the server asked for, capped; None when it asked for none."""
        if error.retry_after_s is None:
            return None
        return max(0.0, min(error.retry_after_s, self.max_retry_after_s))

    def next_delay_s(
        self, error: APIError, attempts: int, elapsed_s: float, rng: Callable[[], float] = random.random
    ) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and record the error."""
        if not error.retryable or error.fatal or attempts >= self.max_attempts:
            return None
        if error.error_type in MALFORMED and attempts >= MALFORMED_MAX_ATTEMPTS:
            return None
        delay = self.server_delay_s(error)
        if delay is None:
            delay = self.backoff_s(attempts, rng)
        if elapsed_s + delay > self.max_retry_time_s:
            return None
        return delay


def parse_retry_after(value: str | None, now_epoch_s: float) -> float | None:
    """``Retry-After`` as seconds from now: ``"2"``, ``"1.5"`` or an HTTP date. None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            # RFC 5322's "-0000" (and a bare date) parse as naive: HTTP dates are always UTC.
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - now_epoch_s
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
