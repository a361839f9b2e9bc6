"""A TPM limit bound by long answers, in virtual time: the limiter against the simulator's own
account of the server's minute (:class:`~batchkimi.simulator.limits.KeyLimits`), which counts
a prompt when it admits the request and the completion when it answers."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random

from batchkimi.policy.ratelimit import CompletionEstimate, RateLimiter
from batchkimi.simulator.limits import KeyLimits


class VirtualClock:
    """Every sleeper wakes in time order; time jumps when nothing else can run."""

    def __init__(self) -> None:
        self.t = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.t + max(0.0, seconds), next(self._seq), fut))
        await fut

    async def drive(self, until: float) -> None:
        while self.t < until:
            for _ in range(20):  # let everything woken run until it sleeps again
                await asyncio.sleep(0)
            while self._timers and self._timers[0][2].cancelled():
                heapq.heappop(self._timers)
            if not self._timers:
                continue  # a task between two sleeps: let it run
            t, _, fut = heapq.heappop(self._timers)
            self.t = max(self.t, t)
            fut.set_result(None)


TPM = 200_000
PROMPT = 20


def long_answer(rng: random.Random) -> int:
    """The simulator's Kimi shape with thinking on (lognormal reasoning and answer), cut at 32,768."""
    reasoning = math.exp(rng.gauss(math.log(1800), 1.2))
    answer = math.exp(rng.gauss(math.log(300), 0.8))
    return int(min(32768, reasoning + answer))


def rehearse(window: bool, seconds: float = 600.0, workers: int = 256, skip: float = 60.0,
             seed: int = 7) -> tuple[float, int, int]:
    """(share of the TPM limit the server counted after ``skip`` seconds, 429s, requests)."""
    clock = VirtualClock()
    server = KeyLimits(tpm=TPM, clock=clock.now)
    counted: list[tuple[float, int]] = []
    rng = random.Random(seed)
    lim = RateLimiter(concurrency=workers, tpm=TPM, clock=clock, completion=CompletionEstimate(32768),
                      window=window)
    refused = sent = 0

    async def worker() -> None:
        nonlocal refused, sent
        while True:
            permit = await lim.acquire(PROMPT)
            sent += 1
            verdict = server.admit("k", PROMPT)
            if verdict is not None:
                refused += 1
                lim.release(permit, 0)
                lim.cool_down(verdict[1])
                continue
            counted.append((clock.now(), PROMPT))
            completion = long_answer(rng)
            await clock.sleep(1.5 + completion / 60)  # time to the first token, then 60 tokens a second
            server.done("k", completion)
            counted.append((clock.now(), completion))
            lim.release(permit, PROMPT + completion, completion)

    async def main() -> None:
        tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
        await clock.drive(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    used = sum(tokens for t, tokens in counted if skip <= t < seconds)
    return used / (seconds - skip) * 60 / TPM, refused, sent


def test_long_answers_use_the_tpm_limit_without_a_429() -> None:
    """The answers land minutes after they were sent, in bursts no reservation foresees; the
    mirrored minute holds each request while the server's minute is full, so none is refused,
    and the bucket catches up after a burst, so the limit is used."""
    share, refused, sent = rehearse(window=True)
    assert refused == 0, f"{refused} of {sent} requests refused"
    assert share >= 0.9, share


def test_once_the_long_answers_flow_the_limit_is_used_to_95_percent() -> None:
    """After ten minutes (answers of up to nine minutes have begun to land), over forty more: the
    bucket keeps what the full minute held back (it holds twice the time a request takes), so
    the limit is used as the answers allow. A bucket of 5 s used 85% of it."""
    share, refused, sent = rehearse(window=True, seconds=3000.0, skip=600.0, seed=1)
    assert refused == 0 and share >= 0.95, (share, refused, sent)


def test_the_bucket_alone_meets_429s_on_long_answers() -> None:
    """What the mirror is for: reserving the mean of the answers seen so far (the short ones
    come back first) sends into a full minute."""
    share, refused, sent = rehearse(window=False)
    assert refused >= 5, (refused, sent)


def test_a_prompt_refused_with_429_is_not_counted_in_the_mirror() -> None:
    """The server counted neither the refused prompt nor, of course, an answer; the mirror keeps
    only the prompt that was admitted."""
    clock = VirtualClock()
    lim = RateLimiter(concurrency=10, tpm=6000, clock=clock)

    async def go() -> float:
        driver = asyncio.ensure_future(clock.drive(1000))
        permit = await lim.acquire(3000)
        lim.release(permit, 0)  # a 429: the server did not count it
        permit = await lim.acquire(3000)
        lim.release(permit, 3000, 0)
        driver.cancel()
        assert lim.window is not None
        return lim.window.total

    assert asyncio.run(go()) == 3000
