"""What the engine tells its hooks: small frozen records. The CLI's hook drives tqdm;
a library user may pass any callable. No hook may block: they run on the event loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RunStarted:
    total_rows: int
    already_done: int
    to_send: int


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """A request went out (after the limiter let it)."""

    attempt: int


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """One HTTP attempt ended (any outcome). ``retry_in_s`` is set when it will be retried."""

    ok: bool
    http_status: int | None
    error_type: str | None
    tokens: int
    retry_in_s: float | None = None


@dataclass(frozen=True, slots=True)
class RowFinished:
    status: str  # ok | error | invalid | truncated
    tokens: int
    attempts: int


@dataclass(frozen=True, slots=True)
class Stopping:
    reason: str


Event = RunStarted | AttemptStarted | AttemptFinished | RowFinished | Stopping
Hook = Callable[[Event], None]


def no_hook(event: Event) -> None:
    return None
