"""What a failed attempt means, decided in one place: :func:`classify` (retryable? fatal?) from
the status, the error type and the message; :func:`decide` the disposition of one failed
attempt: retry it (after a delay, this request alone or every worker), leave the row as an
``error`` row, stop the job (every row would fail alike), or stop the run until the account may
go on (a quota's long wait). The transport only reports what happened; the row engine does
what this says. Pure.

=============================================  =========================================
the attempt                                    disposition
=============================================  =========================================
429 whose Retry-After passes ``max_wait_s``     ``wait``: the run stops, resumable (exit 6)
401, 402, 403, quota or balance, wrong model    ``stop``: every row would fail alike
the breaker's threshold reached                 ``stop``
429, overload, 408, 409, 425, 5xx, a cut or     ``retry`` after the policy's delay, until
stalled stream, a transport failure             ``max_attempts`` / ``max_retry_time_s``
a malformed 2xx answer                          ``retry`` once, then ``final``
any other 4xx                                   ``final``: an ``error`` row
=============================================  =========================================

A 429's wait is shared by every worker (a cool-down) unless it paces one request: an overload
without Retry-After, or a Retry-After of ``SHORT_RETRY_AFTER_S`` or less, while such 429s do
not cluster.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import APIError
from .retry import RetryPolicy

SHORT_RETRY_AFTER_S = 2.0  # a Retry-After this short paces one request, not the whole job
RATE_LIMIT_TYPES = frozenset({"rate_limit_error", "rate_limit_reached_error"})
OVERLOAD_TYPES = frozenset({"engine_overloaded_error", "engine_overloaded", "overloaded_error", "server_overloaded"})
QUOTA_TYPES = frozenset({"exceeded_current_quota_error", "insufficient_quota", "insufficient_balance"})
_QUOTA_WORDS = ("quota", "balance", "suspended", "billing", "insufficient", "exhausted", "inactive")


def classify(status: int, error_type: str, message: str, code: Any) -> tuple[bool, bool]:
    """(retryable, fatal) for an error (see ``docs/kimi-api.md``, "Errors").

    Retried: 408, 409, 425, 429 rate limits and overload, 5xx. Not retried: other 4xx.
    Fatal (stop the job, every row would fail alike): 401, 402, 403; quota or balance errors
    whatever their status (Moonshot sends insufficient balance as a 429); a wrong model or base
    URL (404, or TokenHub's 400 "invalid parameter 'model'"). The error type decides before
    the message's words: a ``rate_limit_error`` that mentions a quota is still a rate limit.
    """
    etype = error_type.lower()
    lowered = f"{error_type} {message} {code}".lower()
    if etype in QUOTA_TYPES or "free_quota_exhausted" in lowered:
        return False, True
    if status in (401, 402, 403):
        return False, True
    if etype in RATE_LIMIT_TYPES or etype in OVERLOAD_TYPES:
        return True, False
    quota = status == 429 and any(w in lowered for w in _QUOTA_WORDS) and "rate limit" not in lowered
    # A wrong base_url or model fails every row alike: 404 (unless about one row's file), or
    # TokenHub's 400 "invalid parameter 'model'".
    wrong_target = (status == 404 and "file" not in lowered) or (status == 400 and "parameter 'model'" in lowered)
    if quota or wrong_target:
        return False, True
    if status in (408, 409, 425, 429) or status >= 500:
        return True, False
    return False, False


def is_overload(error: APIError) -> bool:
    """A 429 that says the server is busy, not that this account is over its limits."""
    return error.http_status == 429 and error.error_type.lower() in OVERLOAD_TYPES


@dataclass(frozen=True)
class Disposition:
    """What to do after a failed attempt (see the module docstring)."""

    action: Literal["retry", "final", "stop", "wait"]
    delay_s: float = 0.0  # retry: the wait before the next attempt
    shared: bool = False  # retry: every worker takes that wait (a cool-down), not this request alone
    # a 429, for the limiter: (wait, how): "shared" every worker waits; "overload" this request
    # backs off; "short" a short Retry-After paces this request (and, on a cluster, its worker)
    cool_down: tuple[float, str] | None = None
    reason: str = ""  # stop: why; wait: the server's words


def decide(error: APIError, attempts: int, elapsed_s: float, policy: RetryPolicy, *, max_wait_s: float,
           clustered: bool = False, breaker_reason: Callable[[APIError], str | None] | None = None,
           rng: Callable[[], float] = random.random) -> Disposition:
    """The disposition of ``error``, the ``attempts``-th failed attempt of a row that started
    ``elapsed_s`` ago. ``clustered``: whether the limiter sees 429s cluster; ``breaker_reason``:
    the breaker's verdict on this attempt (a reason to stop, or None)."""
    rate_limited = error.http_status == 429 and error.retryable
    if rate_limited and error.retry_after_s is not None and error.retry_after_s > max_wait_s:
        return Disposition("wait", delay_s=error.retry_after_s, reason=error.message)
    if error.fatal:
        return Disposition("stop", reason=f"every request would fail like this one: {error}")
    if breaker_reason is not None and (reason := breaker_reason(error)):
        return Disposition("stop", reason=reason)
    cool_down = None
    shared = False
    if rate_limited:
        pause = policy.server_delay_s(error)
        wait = pause if pause is not None else policy.backoff_s(attempts, rng)
        # Short waits that cluster (a limit that really binds) are shared like any other 429.
        short = pause is not None and pause <= SHORT_RETRY_AFTER_S and not clustered
        how = "overload" if is_overload(error) and pause is None else "short" if short else "shared"
        cool_down, shared = (wait, how), how == "shared"
    delay = policy.next_delay_s(error, attempts, elapsed_s, rng)
    if delay is None:
        return Disposition("final", cool_down=cool_down)
    return Disposition("retry", delay_s=delay, shared=shared, cool_down=cool_down)
