"""One request, with its retries, through a shared limiter: :class:`RowEngine`.

It is the whole per-row path (limiter, transport, retry decisions, the result row) and all
another scheduler needs: a Ray actor, or any asyncio worker, builds one with
:meth:`batchkimi.RowEngine.create` (or hands it its own
:class:`~batchkimi.policy.ratelimit.Limiter`) and awaits :meth:`RowEngine.process`.

Guarantees, whatever happens to a request:

- the limiter permit is released exactly once (``finally``), on an answer, an error, a bug or
  a cancellation, so no slot ever leaks;
- after :meth:`RowEngine.stop`, no new attempt starts: a row waiting for the limiter or for its
  back-off raises :class:`RowAbandoned` (it is pending, to be sent on resume), and so does a
  row whose attempt in flight fails retryably;
- a hook that raises never loses the row it was told about (see :class:`~batchkimi.events.SafeHook`);
- a row with local images or videos waits for the job's :class:`~batchkimi.policy.bytes.ByteBudget`
  before its files are read (in a thread), holds it while it is sent and retried, and gives it
  back however it ends; a file that cannot be read then is that row's ``error`` row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from ..config import SIMULATOR, Job
from ..errors import APIError, ConfigError, FatalAPIError
from ..events import AttemptFinished, AttemptStarted, Hook, SafeHook, Waiting, no_hook
from ..http.transport import Reply, Timeouts, Transport
from ..input.media import MediaInvalid
from ..input.send import materialize
from ..output.results import error_row, ok_row
from ..policy.breaker import FailureBreaker
from ..policy.bytes import ByteBudget
from ..policy.disposition import decide
from ..policy.ratelimit import Clock, CompletionEstimate, Limiter, MonotonicClock, RateLimiter
from ..policy.retry import RetryPolicy
from ..request import Prepared
from .summary import cost_usd

COUNTDOWN_FROM_S = 5.0  # a shared wait this long is shown on the progress line


class RowAbandoned(Exception):
    """The engine is stopping and this row was not finished: it stays pending (sent on resume)."""


class AccountWaiting(Exception):
    """A 429 asked for a wait longer than ``max_wait_s`` (a daily quota): the run stops, every
    row not finished stays pending, and the same command resumes once the wait is over."""

    def __init__(self, wait_s: float, message: str) -> None:
        super().__init__(message)
        self.wait_s = wait_s
        self.until_epoch_s = time.time() + wait_s
        self.message = message


class RowEngine:
    """Sends one request, with retries, through a shared :class:`~batchkimi.policy.ratelimit.Limiter`.

    Example (inside any asyncio worker, a Ray actor included)::

        async with batchkimi.RowEngine.create(job, api_key) as engine:
            row = await engine.process("q-17", 17, build_request(record, job))
    """

    def __init__(
        self,
        job: Job,
        transport: Any,
        limiter: Limiter,
        policy: RetryPolicy,
        *,
        hook: Hook = no_hook,
        clock: Clock | None = None,
        rng: Callable[[], float] | None = None,
        breaker: FailureBreaker | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self.job = job
        self.transport = transport
        self.limiter = limiter
        self.policy = policy
        self.hook = hook if isinstance(hook, SafeHook) else SafeHook(hook)
        self.clock = clock or MonotonicClock()
        self.rng = rng or random.random
        self.breaker = breaker
        self.budget = budget or budget_of(job)
        self.requests = 0
        self.retries = 0
        self.stopping = False
        self.sending: set[asyncio.Task[Any]] = set()  # tasks with an attempt in flight

    def stop(self) -> None:
        """From now on no new attempt starts (see the module docstring)."""
        self.stopping = True

    async def process(self, rid: str, pos: int, prepared: Prepared) -> dict[str, Any]:
        """The result row for one request.

        Raises :class:`~batchkimi.errors.FatalAPIError` when the API refuses the job itself
        (auth, quota, wrong model or URL, the breaker): every other request would fail alike;
        :class:`RowAbandoned` when stopping."""
        if not prepared.media:
            return await self._send(rid, pos, prepared)
        if not prepared.reads_files:
            row = await self._send(rid, pos, prepared)
            row["media"] = [item.record() for item in prepared.media]
            return row
        if self.stopping:
            raise RowAbandoned
        need = prepared.request_bytes
        await self.budget.acquire(need)
        try:
            if self.stopping:
                raise RowAbandoned
            job = self.job
            try:
                payload, records = await asyncio.to_thread(
                    materialize, prepared.payload, prepared.media, job.max_image_side, int(job.max_request_mb * 1_000_000))
            except MediaInvalid as exc:
                return error_row(rid, pos, model=job.model, attempts=0, latency_s=0.0, http_status=None,
                                 error_type="media_unreadable", error_message=str(exc), request_id=None)
            row = await self._send(rid, pos, dataclasses.replace(prepared, payload=payload, media=()))
            del payload
        finally:
            self.budget.release(need)
        row["media"] = records
        return row

    async def _send(self, rid: str, pos: int, prepared: Prepared) -> dict[str, Any]:
        attempts = 0
        first_start = self.clock.now()
        streaming = bool(prepared.body.get("stream"))
        while True:
            if self.stopping:
                raise RowAbandoned
            permit = await self.limiter.acquire(prepared.prompt_tokens_estimate)
            used: int | None = None
            completion: int | None = None
            failure: APIError | None = None
            task = asyncio.current_task()
            try:
                if self.stopping:  # the stop came while this row waited: send nothing new
                    used = 0
                    raise RowAbandoned
                attempts += 1
                self.requests += 1
                assert task is not None
                self.sending.add(task)
                self.hook(AttemptStarted(attempts))
                t0 = self.clock.now()
                try:
                    reply: Reply = await self.transport.complete(prepared.body, stream=streaming, payload=prepared.payload,
                                                                 sample=prepared.sample)
                except APIError as exc:
                    failure = exc
                    used = 0 if exc.http_status == 429 else prepared.prompt_tokens_estimate
                else:
                    used, completion = reply.answer.usage.total_tokens, reply.answer.usage.completion_tokens
            finally:
                self.sending.discard(task)  # type: ignore[arg-type]
                self.limiter.release(permit, used, completion)
            if failure is None:
                return self._answered(rid, pos, prepared, reply, attempts, self.clock.now() - t0)
            decided = self._after_failure(failure, attempts, self.clock.now() - first_start)
            if decided is None:
                if self.breaker is not None and (reason := self.breaker.row_failed(failure)):
                    raise FatalAPIError(reason, cause=failure)
                return error_row(rid, pos, model=self.job.model, attempts=attempts, latency_s=self.clock.now() - t0,
                                 http_status=failure.http_status, error_type=failure.error_type,
                                 error_message=failure.message, request_id=failure.request_id,
                                 max_tokens=sent_max_tokens(prepared.body))
            if self.stopping:
                raise RowAbandoned
            self.retries += 1
            delay, shared = decided
            if not shared:
                await self.clock.sleep(delay)  # a shared cool-down's wait is taken in acquire(), by every worker

    def _after_failure(self, exc: APIError, attempts: int, elapsed_s: float) -> tuple[float, bool] | None:
        """Do what :func:`~batchkimi.policy.disposition.decide` says of a failed attempt: stop the
        job or the run (raise), retry after a delay (and whether every worker takes that wait),
        or give up (None). A long shared wait is shown as a countdown."""
        breaker = self.breaker
        d = decide(exc, attempts, elapsed_s, self.policy, max_wait_s=self.job.max_wait_s,
                   clustered=getattr(self.limiter, "clustered", False),
                   breaker_reason=breaker.attempt_failed if breaker is not None else None, rng=self.rng)
        if d.action == "wait":
            self.hook(AttemptFinished(False, exc.http_status, exc.error_type, 0))
            raise AccountWaiting(d.delay_s, d.reason)
        if d.action == "stop":
            self.hook(AttemptFinished(False, exc.http_status, exc.error_type, 0))
            raise FatalAPIError(d.reason, cause=exc) from exc
        if d.cool_down is not None:
            wait, how = d.cool_down
            pace = getattr(self.limiter, "pace", None) if how == "short" else None
            if pace is not None:
                pace(wait)
            else:
                self.limiter.cool_down(wait, overload=how != "shared")
            if how == "shared" and wait >= COUNTDOWN_FROM_S:
                self.hook(Waiting(time.time() + wait, f"{exc.error_type}: the server asked every request to wait"))
        delay = d.delay_s if d.action == "retry" else None
        self.hook(AttemptFinished(False, exc.http_status, exc.error_type, 0, delay))
        return None if delay is None else (delay, d.shared)

    def _answered(self, rid: str, pos: int, prepared: Prepared, reply: Reply, attempts: int, latency: float) -> dict[str, Any]:
        if self.breaker is not None and self.breaker.armed:
            self.breaker.succeeded()
        answer = reply.answer
        usage = answer.usage
        if reply.ratelimit_reset_s:
            self.limiter.pause(reply.ratelimit_reset_s)
        status, error_type, message = "ok", None, None
        if answer.finish_reason == "length":
            status = "truncated"
            if not answer.content and not answer.tool_calls:
                error_type = "reasoning_exhausted_budget"
                message = (
                    f"finish_reason=length with an empty answer: the reasoning used the whole "
                    f"max_tokens budget ({prepared.body.get('max_tokens', 'default')}); raise max_tokens"
                )
            else:
                error_type = "max_tokens_reached"
                message = "finish_reason=length: the answer was cut at max_tokens"
        elif answer.finish_reason == "content_filter":
            status, error_type, message = "error", "content_filter", "the answer was withheld by the content filter"
        self.hook(AttemptFinished(True, reply.http_status, None, usage.total_tokens or 0))
        model = answer.model or self.job.model
        return ok_row(
            rid, pos, status=status, content=answer.content, reasoning_content=answer.reasoning_content,
            tool_calls=orjson.dumps(answer.tool_calls).decode() if answer.tool_calls else None,
            finish_reason=answer.finish_reason, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens,
            cost_usd=cost_usd(self.job.price_table, model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
            model=model, attempts=attempts, latency_s=latency, ttft_s=answer.ttft_s, http_status=reply.http_status,
            error_type=error_type, error_message=message, request_id=reply.request_id,
            max_tokens=sent_max_tokens(prepared.body), warnings=answer.warnings, response_id=answer.response_id,
        )


def sent_max_tokens(body: dict[str, Any]) -> int | None:
    """The completion budget a request was sent with (``max_completion_tokens`` wins, as at Kimi)."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if type(value) is int else None


def timeouts_of(job: Job) -> Timeouts:
    return Timeouts(job.connect_timeout_s, job.first_byte_timeout_s, job.idle_timeout_s, job.attempt_timeout_s)


def budget_of(job: Job) -> ByteBudget:
    return ByteBudget(int(job.max_mb_in_flight * 1_000_000))


def limiter_of(job: Job) -> RateLimiter:
    return RateLimiter(concurrency=job.concurrency, rpm=job.rpm, tpm=job.tpm,
                       completion=CompletionEstimate(job.effective_max_tokens))


def policy_of(job: Job) -> RetryPolicy:
    return RetryPolicy(job.max_attempts, job.max_retry_time_s, job.backoff_base_s, job.backoff_max_s, job.max_retry_after_s)


@contextlib.asynccontextmanager
async def endpoint(job: Job, api_key: str, base_url: str | None = None, *,
                   ca_pem: bytes | None = None) -> AsyncIterator[Transport]:
    """A transport to ``base_url`` (default: the job's), trusting ``ca_pem`` besides the job's
    ``ca_file``. A URL only: :func:`batchkimi.api.serving` resolves ``"simulator"``."""
    url = base_url or job.base_url
    if url == SIMULATOR:
        raise ConfigError("base_url 'simulator' is served by batchkimi's doors (batchkimi.run, run_async, "
                          "batchkimi.RowEngine.create): open the transport through them")
    async with Transport(url, api_key, timeouts_of(job), ca_file=job.ca_file, ca_pem=ca_pem) as transport:
        yield transport
