"""The cluster's shared rate limit, without a cluster: :class:`GlobalLimit` (the limit actor's
body) called in order from the same process, as Ray runs an actor's calls, and two workers'
:class:`LeasedLimiter`. What a user relies on: a 429 one worker meets pauses the others too, even
those holding leased requests, and no request is granted twice."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from batchkimi.execution.ray_limiter import UNIT_TTL_S, GlobalLimit, LeasedLimiter


class _Method:
    """``actor.method.remote(*args)``: the call runs at once (an actor runs one call at a time,
    in the order a caller sent them) and its answer is awaitable, as an ObjectRef is."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(self.fn(*args))
        return fut


class InProcessActor:
    def __init__(self, body: GlobalLimit) -> None:
        self.body = body
        for name in ("lease", "cool_down", "pause"):
            setattr(self, name, _Method(getattr(body, name)))


def _workers(n: int = 2, **limits: Any) -> tuple[GlobalLimit, list[LeasedLimiter]]:
    body = GlobalLimit(rpm=limits.get("rpm", 0), tpm=limits.get("tpm", 0), concurrency=16)
    actor = InProcessActor(body)
    return body, [LeasedLimiter(actor, rpm=limits.get("rpm", 0), tpm=limits.get("tpm", 0), concurrency=16, workers=n,
                                max_tokens=64) for _ in range(n)]


def test_a_429_one_worker_meets_pauses_another_that_holds_leased_requests() -> None:
    async def main() -> tuple[float, float]:
        _, (a, b) = _workers()
        b.release(await b.acquire(10), 10, 5)
        assert b.units > 0  # b holds leased requests the actor cannot see
        cooled = time.monotonic()
        a.cool_down(0.6)  # a met a 429 with Retry-After 0.6
        await asyncio.sleep(UNIT_TTL_S + 0.05)
        t0 = time.monotonic()
        b.release(await b.acquire(10), 10, 5)
        return cooled, time.monotonic() - t0

    cooled, waited = asyncio.run(main())
    # b's next request waits for the end of the shared cool-down (a sleep never ends early)
    assert waited >= 0.6 - (UNIT_TTL_S + 0.05) - 0.01, waited


class _Frozen:
    """The actor's clock, stopped: its buckets change only by what is leased and handed back."""

    def __init__(self, at: float) -> None:
        self.at = at

    def now(self) -> float:
        return self.at


def test_stale_leases_handed_back_are_neither_lost_nor_granted_twice() -> None:
    """Units held past ``UNIT_TTL_S`` go back to the actor before the next lease: after two
    workers each used two requests, the actor's request bucket is down by exactly four."""

    async def main() -> GlobalLimit:
        body = GlobalLimit(rpm=6000, tpm=0, concurrency=16)
        body.lim.clock, body.lim._req_level = _Frozen(body.lim._last), 10.0
        actor = InProcessActor(body)
        a, b = (LeasedLimiter(actor, rpm=6000, tpm=0, concurrency=16, workers=2, max_tokens=64, chunk=4) for _ in range(2))
        for w in (a, b):
            w.release(await w.acquire(10), 10, 5)
        await asyncio.sleep(UNIT_TTL_S + 0.05)  # both hold three stale units now
        for w in (a, b):
            w.release(await w.acquire(10), 10, 5)
            assert w.units == 3  # the stale three went back, four fresh came
        for w in (a, b):
            await w.settle()
        return body

    body = asyncio.run(main())
    assert body.lim._req_level == 10.0 - 4
    assert body.units == 16  # four leases of four: two first, two after the stale units went back
