"""What the engine tells its hooks: small frozen records. The CLI's hook drives tqdm;
a library user may pass any callable. No hook may block: they run on the event loop.
A hook that raises does not lose the row it was told about: the run stops with its error
after writing what is done (:class:`SafeHook`)."""

from __future__ import annotations

import logging
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


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user should know, said once (a thinking budget under Kimi's floor, a wait)."""

    message: str


@dataclass(frozen=True, slots=True)
class Waiting:
    """Every request waits until ``until_epoch_s`` (a 429's Retry-After); 0: the wait is over."""

    until_epoch_s: float
    reason: str


Event = RunStarted | AttemptStarted | AttemptFinished | RowFinished | Stopping | Notice | Waiting
Hook = Callable[[Event], None]


def no_hook(event: Event) -> None:
    return None


class SafeHook:
    """Calls a hook; a hook that raises never breaks a row. The first exception is kept in
    ``error`` and handed to ``on_error`` (the run stops with it), later events still go out."""

    __slots__ = ("hook", "on_error", "error")

    def __init__(self, hook: Hook, on_error: Callable[[BaseException], None] | None = None) -> None:
        self.hook = hook
        self.on_error = on_error
        self.error: BaseException | None = None

    def __call__(self, event: Event) -> None:
        try:
            self.hook(event)
        except Exception as exc:  # noqa: BLE001 - a user's hook: anything may come out
            if self.error is None:
                self.error = exc
                if self.on_error is not None:
                    self.on_error(exc)
                else:  # a RowEngine used alone: nobody stops on it, so at least say it
                    logging.getLogger("batchkimi").error("the hook raised on %r; the row goes on", event, exc_info=exc)
