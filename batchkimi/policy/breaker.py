"""Stop a job that cannot work: its first rows all fail alike and none succeeded. Pure.

A gateway or proxy refusing the whole job (a wrong key, an unknown model, a parameter it does
not support: LiteLLM's ``UnsupportedParamsError ['thinking']``) answers every row with the same
400 that batchkimi cannot recognise as job-wide by itself; a host that cannot be reached fails
every attempt. Without a breaker such a job pays (or waits) for every row of the dataset.

- **Rows**: when ``threshold`` rows in a row fail with the same non-retryable error (HTTP
  status, error type, code and message with its numbers blanked) before any attempt of the run
  succeeded, the job stops.
- **Attempts**: when ``threshold`` attempts in a row cannot reach the server (connection refused,
  DNS failure, connect timeout) before any succeeded, the job stops; retries count, so a dead
  host stops the job in seconds, not after every row's backoff. A row that runs out of
  attempts that way before anything succeeded stops it too (and stays pending, not an error).

One successful answer disarms the breaker for the rest of the run: a row-specific 400 among
successes never stops a job. ``threshold = 0`` disables it.
"""

from __future__ import annotations

import re

from ..errors import APIError

UNREACHABLE = frozenset({"connect_error", "connect_timeout"})
_NUMBERS = re.compile(r"\d+")


def signature(error: APIError) -> tuple[object, ...]:
    return (error.http_status, error.error_type, error.code, _NUMBERS.sub("#", error.message)[:200])


class FailureBreaker:
    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.armed = threshold > 0
        self._unreachable = 0
        self._alike = 0
        self._last: tuple[object, ...] | None = None

    def succeeded(self) -> None:
        self.armed = False

    def attempt_failed(self, error: APIError) -> str | None:
        """After each failed attempt: a reason to stop the job, or None."""
        if not self.armed:
            return None
        if error.error_type not in UNREACHABLE:
            self._unreachable = 0
            return None
        self._unreachable += 1
        if self._unreachable >= self.threshold:
            return f"the first {self._unreachable} attempts could not reach the server and none succeeded ({error})"
        return None

    def row_failed(self, error: APIError) -> str | None:
        """After a row ends as an error: a reason to stop the job, or None."""
        if not self.armed:
            return None
        if error.error_type in UNREACHABLE:
            return f"a row used all its attempts and could not reach the server; nothing has succeeded ({error})"
        if error.retryable:
            return None
        sig = signature(error)
        self._alike = self._alike + 1 if sig == self._last else 1
        self._last = sig
        if self._alike >= self.threshold:
            return f"the first {self._alike} rows all failed alike and none succeeded: {error}"
        return None
