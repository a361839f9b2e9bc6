"""One rate limit for a whole Ray cluster: a named actor holds the budget, workers lease it.

:class:`GlobalLimit` is the actor's body: the same :class:`~batchkimi.policy.ratelimit.RateLimiter`
state the local engine uses (token buckets for requests and tokens, the shared 429 cool-down,
the AIMD share), driven by leases instead of awaits. One exists per (endpoint, API key) in a
cluster, named by a hash of both (:func:`limit_name`), so every job on that key shares it.

:class:`LeasedLimiter` is what each worker's :class:`~batchkimi.execution.row.RowEngine` holds
(the :class:`~batchkimi.policy.ratelimit.Limiter` protocol). It takes *units* (one request with its
expected tokens) from the actor a few at a time, so the actor answers a call per few requests,
not per request; reports what requests really used on the next call; forwards 429s to the
actor, whose cool-down and cut then reach every worker at its next lease (units held longer than
``UNIT_TTL_S`` go back first, so within a fifth of a second). Concurrency is
each worker's even share of the job's, times the cluster's AIMD share: a slot is held for a
whole request (seconds), so there is nothing to gain from moving slots between workers.

If the actor cannot be reached (a lease fails or takes over ``LEASE_TIMEOUT_S``), the worker
falls back to a local limiter with an even share of every budget, and says so once.

Ray is imported only by :func:`limit_actor` and at a lease; this module imports without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import Any

from ..policy.ratelimit import CompletionEstimate, Permit, RateLimiter

log = logging.getLogger("batchkimi.ray")

LEASE_TIMEOUT_S = 10.0
# Leased units older than this go back to the actor before use, so a cluster cool-down (a 429
# another worker met) reaches a worker that holds units within this time, not at its next lease.
UNIT_TTL_S = 0.2
_EPS = 1e-6


def limit_name(base_url: str, api_key: str) -> str:
    """The actor's name: the same endpoint and key give the same name; the key is not in it."""
    digest = hashlib.sha256(f"{base_url.rstrip('/')}\0{api_key}".encode()).hexdigest()[:16]
    return f"batchkimi-limit-{digest}"


class GlobalLimit:
    """The budget of one (endpoint, key) for a whole cluster (the body of a Ray actor).

    Every method is synchronous and cheap: Ray runs an actor's calls one at a time, so the
    state needs no lock, and a lease never waits inside the actor (it says how long to wait)."""

    def __init__(self, rpm: float, tpm: float, concurrency: int) -> None:
        self.lim = RateLimiter(concurrency=concurrency, rpm=rpm, tpm=tpm, window=False)  # it sees no answers
        self.leases = 0
        self.units = 0
        self.busy_s = 0.0  # CPU time spent answering, for the cost per permit

    def configure(self, rpm: float, tpm: float, concurrency: int) -> None:
        """A job with other limits took the same key: the latest job's limits hold."""
        lim = self.lim
        lim.rpm, lim.tpm, lim.concurrency = rpm, tpm, concurrency
        lim.decrease_factor = 0.9 if rpm or tpm else 0.7

    def lease(self, units: int, unit_tokens: int, token_adjust: int = 0, returned: int = 0) -> tuple[int, float, float]:
        """Grant up to ``units`` requests of ``unit_tokens`` each; fold in ``token_adjust``
        (tokens really used minus tokens leased, since the last call) and ``returned`` units
        never used. Returns (granted, wait_s before asking again if fewer were granted, the AIMD
        share of concurrency)."""
        t0 = time.process_time()
        try:
            lim = self.lim
            now = lim.clock.now()
            lim._refill(now)
            if lim.tpm and token_adjust:
                lim._tok_level -= token_adjust
            if lim.rpm and returned:
                lim._req_level = min(lim._req_capacity, lim._req_level + returned)
            self.leases += 1
            if now < lim._cool_until:
                return 0, lim._cool_until - now, lim.share
            granted, wait = 0, 0.0
            need = min(float(unit_tokens), lim._tok_capacity) if lim.tpm and unit_tokens else 0.0
            while granted < units:
                if lim.rpm and lim._req_level < 1.0 - _EPS:
                    wait = (1.0 - lim._req_level) / lim._req_rate
                if need and lim._tok_level < need - _EPS * need:
                    wait = max(wait, (need - lim._tok_level) / lim._tok_rate)
                if wait > 0:
                    break
                if lim.rpm:
                    lim._req_level -= 1.0
                if lim.tpm:
                    lim._tok_level -= unit_tokens
                granted += 1
            self.units += granted
            lim._released_since += granted  # attempts, for the share of 429s that makes a cluster
            return granted, max(wait, 1e-3) if granted < units else 0.0, lim.share
        finally:
            self.busy_s += time.process_time() - t0

    def cool_down(self, delay_s: float, overload: bool = False) -> None:
        self.lim.cool_down(delay_s, overload=overload)

    def pause(self, delay_s: float) -> None:
        self.lim.pause(delay_s)

    def stats(self) -> dict[str, Any]:
        lim = self.lim
        return {"leases": self.leases, "units": self.units, "busy_s": self.busy_s, "process_cpu_s": time.process_time(),
                "share": lim.share,
                "rate_limited": lim.rate_limited, "cuts": lim.cuts, "rpm": lim.rpm, "tpm": lim.tpm}


def limit_actor(base_url: str, api_key: str, rpm: float, tpm: float, concurrency: int) -> Any:
    """The cluster's limit actor for this endpoint and key (made on first use, detached so that
    jobs come and go around it; tiny: no CPU reserved), set to this job's limits."""
    import ray

    remote: Any = ray.remote(GlobalLimit)
    actor = (remote
             .options(name=limit_name(base_url, api_key), namespace="batchkimi", lifetime="detached",
                      get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=0)
             .remote(rpm, tpm, concurrency))
    ray.get(actor.configure.remote(rpm, tpm, concurrency))
    return actor


class _Leased(Permit):
    __slots__ = ()


class LeasedLimiter:
    """A worker's share of the cluster's limit (see the module docstring)."""

    def __init__(self, actor: Any, *, rpm: float, tpm: float, concurrency: int, workers: int,
                 max_tokens: int | None, chunk: int | None = None, timeout_s: float = LEASE_TIMEOUT_S) -> None:
        self.actor = actor
        self.rpm, self.tpm, self.concurrency, self.workers = rpm, tpm, concurrency, max(1, workers)
        self.completion = CompletionEstimate(max_tokens)
        # A few units a lease: about a tenth of a second of this worker's share of the rate.
        per_s = rpm / 60 / self.workers if rpm else 50.0
        self.chunk = chunk or max(1, min(16, math.ceil(per_s / 10)))
        self.timeout_s = timeout_s
        self.share = 1.0
        self.units = 0  # leased, not yet used
        self.unit_tokens = 0  # tokens leased with each of them
        self.token_adjust = 0  # used minus leased, not yet reported
        self.leased_at = 0.0
        self.in_flight = 0
        self.cool_until = 0.0
        self.rate_limited = 0
        self.fallback: RateLimiter | None = None
        self._lock = asyncio.Lock()
        self._released = asyncio.Event()
        self._sent: list[Any] = []  # cool-downs forwarded, checked at the next actor call

    @property
    def concurrency_cap(self) -> int:
        return max(1, math.ceil(self.concurrency * self.share / self.workers))

    def _fall_back(self, why: str) -> None:
        if self.fallback is not None:
            return
        n = self.workers
        log.warning("batchkimi: the cluster's rate-limit actor cannot be reached (%s); this worker now keeps to "
                    "1/%d of the job's budget on its own", why, n)
        self.fallback = RateLimiter(concurrency=max(1, math.ceil(self.concurrency / n)), rpm=self.rpm / n,
                                    tpm=self.tpm / n, completion=self.completion)
        self.fallback.in_flight = self.in_flight  # leased permits still out count against it

    async def _lease(self, tokens: int) -> float:
        """Ask the actor for units of ``tokens`` (handing back any still held); returns how long
        to wait when none came."""
        returned = self.units
        adjust, self.token_adjust = self.token_adjust - returned * self.unit_tokens, 0
        self.units = 0
        try:
            granted, wait, share = await asyncio.wait_for(
                self._answer(self.actor.lease.remote(self.chunk, tokens, adjust, returned)), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - dead actor, lost node, timeout: the budget goes local
            self._fall_back(f"{type(exc).__name__}: {exc}"[:200])
            return 0.0
        self.share = share
        if granted:
            self.units, self.unit_tokens, self.leased_at = granted, tokens, time.monotonic()
        return wait

    async def _answer(self, ref: Any) -> Any:
        """The answer of an actor call, after those of the cool-downs forwarded before it (the
        actor runs one caller's calls in order, so these are already done or about to be; one
        that failed means the actor is gone)."""
        sent, self._sent = self._sent, []
        for done in sent:
            await done
        return await ref

    async def acquire(self, prompt_tokens: int = 0) -> Permit:
        if self.fallback is not None:
            return await self.fallback.acquire(prompt_tokens)
        async with self._lock:
            while True:
                if self.fallback is not None:
                    return await self.fallback.acquire(prompt_tokens)
                now = time.monotonic()
                if now < self.cool_until:
                    await asyncio.sleep(self.cool_until - now)
                    continue
                if self.in_flight >= self.concurrency_cap:
                    self._released.clear()
                    await self._released.wait()
                    continue
                tokens = prompt_tokens + self.completion.tokens() if self.tpm else prompt_tokens
                if self.units < 1 or now - self.leased_at > UNIT_TTL_S:
                    wait = await self._lease(tokens)
                    if self.units < 1:
                        if wait > 0:
                            await asyncio.sleep(wait)
                        continue
                self.units -= 1
                self.in_flight += 1
                permit = _Leased(self.unit_tokens)
                if self.tpm and tokens != self.unit_tokens:
                    self.token_adjust += tokens - self.unit_tokens
                    permit.reserved_tokens = tokens
                return permit

    def release(self, permit: Permit, actual_tokens: int | None = None, completion_tokens: int | None = None) -> None:
        if permit.released:
            return
        if not isinstance(permit, _Leased):
            assert self.fallback is not None
            self.fallback.release(permit, actual_tokens, completion_tokens)
            return
        permit.released = True
        self.in_flight -= 1
        if self.fallback is not None:
            self.fallback.in_flight -= 1
            self.fallback._released.set()
        if completion_tokens is not None:
            self.completion.observe(completion_tokens)
        if self.tpm and actual_tokens is not None:
            self.token_adjust += actual_tokens - permit.reserved_tokens
        self._released.set()

    def pace(self, delay_s: float) -> None:
        """A short Retry-After, on a cluster: a shared cool-down, as any rate-limit 429 (this
        worker pauses now, the others within ``UNIT_TTL_S``). Workers hold leased requests, so a
        limit that binds is only found in time by pausing at once: with pacing per request, 40
        to 47 429s came for 60 answers where pausing gave 29 to 33 (the Ray test of 429s, by
        hand). The local engine paces a short Retry-After per request."""
        self.cool_down(delay_s, overload=False)

    def cool_down(self, delay_s: float, *, overload: bool = False) -> None:
        self.rate_limited += 1
        if self.fallback is not None:
            self.fallback.cool_down(delay_s, overload=overload)
            return
        if not overload:  # this worker pauses now; the others within UNIT_TTL_S
            self.cool_until = max(self.cool_until, time.monotonic() + delay_s)
        self._forward("cool_down", delay_s, overload)

    def pause(self, delay_s: float) -> None:
        if self.fallback is not None:
            self.fallback.pause(delay_s)
            return
        self.cool_until = max(self.cool_until, time.monotonic() + delay_s)
        self._forward("pause", delay_s)

    def _forward(self, method: str, *args: Any) -> None:
        try:
            self._sent.append(getattr(self.actor, method).remote(*args))
        except Exception as exc:  # noqa: BLE001 - the actor is gone
            self._fall_back(f"{type(exc).__name__}: {exc}"[:200])

    async def settle(self) -> None:
        """Report the tokens used and give back the unused units (a worker going idle)."""
        if self.fallback is not None or not (self.token_adjust or self.units):
            return
        adjust, returned = self.token_adjust - self.units * self.unit_tokens, self.units
        self.token_adjust, self.units = 0, 0
        try:
            await asyncio.wait_for(self._answer(self.actor.lease.remote(0, 0, adjust, returned)), self.timeout_s)
        except Exception as exc:  # noqa: BLE001
            self._fall_back(f"{type(exc).__name__}: {exc}"[:200])

