"""The limiter and the retry policy, with an injected clock: no real sleeps."""

from __future__ import annotations

import asyncio
import email.utils

import pytest

from batchkimi.errors import APIError
from batchkimi.policy.ratelimit import CompletionEstimate, RateLimiter
from batchkimi.policy.retry import RetryPolicy, parse_retry_after


class FakeClock:
    """Time moves only when someone sleeps."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_rpm_paces_requests_evenly_without_a_start_burst() -> None:
    """120 RPM: one request at once, then one every 0.5 s (x 1/0.99 headroom); 120 take about a minute."""
    clock = FakeClock()

    async def go() -> list[float]:
        lim = RateLimiter(concurrency=1000, rpm=120, clock=clock)
        times = []
        for _ in range(121):
            p = await lim.acquire()
            times.append(clock.now() - 1000.0)
            lim.release(p)
        return times

    times = run(go())
    assert times[0] == 0.0
    assert times[1] > 0.45  # no burst at second zero
    # within any 60 s window there are at most 120 requests
    assert max(sum(1 for t in times if start <= t < start + 60) for start in times) <= 120
    assert 60.0 <= times[120] <= 61.5


def test_tpm_reserves_the_estimate_and_reconciles_the_real_usage() -> None:
    """6,000 TPM = 100 tokens/s: a 500-token estimate waits for its tokens; an overrun is paid back later."""
    clock = FakeClock()

    async def go() -> tuple[float, float, float]:
        lim = RateLimiter(concurrency=100, tpm=6000, headroom=1.0, clock=clock, window=False)  # the bucket alone
        p = await lim.acquire(50)
        first = clock.now() - 1000
        lim.release(p, 50 + 400)  # used 400 more than reserved: debt
        p = await lim.acquire(50)
        second = clock.now() - 1000
        lim.release(p, 50)
        p = await lim.acquire(50)
        third = clock.now() - 1000
        lim.release(p, 50)
        return first, second, third

    first, second, third = run(go())
    # the bucket holds a quarter second (25 tokens); a bigger request goes into debt
    assert first == pytest.approx(0.25)  # starts empty: no burst at second zero
    assert second == pytest.approx(first + 4.5, rel=0.01)  # 25 of debt + 400 overrun + the 25 it needs, at 100/s
    assert third == pytest.approx(second + 0.5, rel=0.01)  # 25 of debt + 25


def test_concurrency_cap_holds_and_release_frees_a_slot() -> None:
    clock = FakeClock()

    async def go() -> tuple[int, bool, bool]:
        lim = RateLimiter(concurrency=3, clock=clock)
        permits = [await lim.acquire() for _ in range(3)]
        waiter = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(0.01)
        blocked = not waiter.done()
        lim.release(permits[0])
        await asyncio.sleep(0.01)
        admitted = waiter.done()
        return lim.in_flight, blocked, admitted

    in_flight, blocked, admitted = run(go())
    assert blocked and admitted and in_flight == 3  # the fourth waited, then took the freed slot


def test_a_429_cools_down_every_worker_and_cuts_then_restores_the_rate() -> None:
    """One cool-down for all; the share drops by decrease_factor and climbs back linearly."""
    clock = FakeClock()

    async def go() -> tuple[float, float, float, float]:
        lim = RateLimiter(concurrency=100, rpm=600, clock=clock, recovery_per_s=0.1)
        p = await lim.acquire()
        lim.release(p)
        lim.cool_down(5.0)
        lim.cool_down(5.0)  # a second 429 in the same cool-down does not cut again
        share_after = lim.share
        t0 = clock.now()
        p = await lim.acquire()  # waits out the cool-down
        waited = clock.now() - t0
        lim.release(p)
        clock.t += 2.0
        lim._refill(clock.now())
        share_later = lim.share
        clock.t += 100.0
        lim._refill(clock.now())
        return share_after, waited, share_later, lim.share

    share_after, waited, share_later, share_final = run(go())
    assert share_after == pytest.approx(0.9)  # the job states its rpm: a gentle cut
    assert waited >= 5.0
    assert share_later > share_after
    assert share_final == 1.0


def test_concurrency_shrinks_with_the_share_and_blind_pacing_cuts_harder() -> None:
    lim = RateLimiter(concurrency=10, clock=FakeClock())  # no rpm or tpm: the 429s are all it knows
    lim.cool_down(1.0)
    assert lim.share == pytest.approx(0.7) and lim.concurrency_cap == 7


def test_completion_estimate_starts_from_a_prior_and_learns_the_mean() -> None:
    """Not max_tokens: with thinking's 32k budget that would leave the TPM quota idle."""
    est = CompletionEstimate(max_tokens=32768)
    assert est.tokens() == 1024
    for v in (100, 200, 300):
        est.observe(v)
    assert est.tokens() == 200
    capped = CompletionEstimate(max_tokens=16)
    assert capped.tokens() == 16


def err(**kw) -> APIError:  # noqa: ANN003
    base = dict(error_type="x", retryable=True)
    base.update(kw)
    return APIError("m", **base)


@pytest.mark.parametrize(
    "error,attempts,elapsed,expected",
    [
        pytest.param(err(retryable=False), 1, 0, None, id="not-retryable"),
        pytest.param(err(fatal=True), 1, 0, None, id="fatal"),
        pytest.param(err(), 6, 0, None, id="attempts-spent"),
        pytest.param(err(retry_after_s=7.0), 1, 0, 7.0, id="retry-after"),
        pytest.param(err(retry_after_s=99999.0), 1, 0, None, id="retry-after-capped-then-over-time-budget"),
        pytest.param(err(), 3, 0, 2.0, id="backoff-ceiling-4s-times-rng"),
        pytest.param(err(), 1, 1799.9, None, id="time-budget"),
    ],
)
def test_retry_policy_decisions(error: APIError, attempts: int, elapsed: float, expected: float | None) -> None:
    policy = RetryPolicy(max_attempts=6, max_retry_time_s=1800, backoff_base_s=1, backoff_max_s=60, max_retry_after_s=3600)
    assert policy.next_delay_s(error, attempts, elapsed, rng=lambda: 0.5) == expected


def test_full_jitter_backoff_is_capped() -> None:
    policy = RetryPolicy(backoff_base_s=1, backoff_max_s=60)
    assert policy.backoff_s(20, rng=lambda: 1.0) == 60
    assert policy.backoff_s(1, rng=lambda: 1.0) == 1
    assert RetryPolicy.no_wait().backoff_s(5) == 0


def test_parse_retry_after_seconds_and_http_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30, abs=1)
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("-5", now) == 0.0


class ManualClock:
    """Time moves only when the test calls advance(); sleepers wake when their time comes."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleepers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.t + seconds, fut))
        await fut

    def advance(self, dt: float) -> None:
        self.t += dt
        for when, fut in self.sleepers:
            if when <= self.t and not fut.done():
                fut.set_result(None)


def test_a_token_waiter_wakes_when_an_estimates_debt_is_forgiven() -> None:
    """The first request reserves a large prior; when its real usage is small, the next one need not wait it out."""
    clock = ManualClock()

    async def go() -> float:
        lim = RateLimiter(concurrency=10, tpm=6000, headroom=1.0, clock=clock, window=False)  # the bucket: 100 tokens/s
        lim._tok_level = 100.0
        first = await lim.acquire(1000)  # 900 in debt now
        waiter = asyncio.ensure_future(lim.acquire(100))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # it waits for (100 + 900) / 100 = 10 s of refill
        lim.release(first, 100)  # it used 100, not 1000: 900 of debt forgiven, the level is 0
        await asyncio.sleep(0.01)
        clock.advance(1.0)  # one second refills the 100 it needs
        p = await asyncio.wait_for(waiter, 1)
        lim.release(p, 100)
        return clock.now()

    assert run(go()) == 1.0  # not the 10 s it computed before the debt was forgiven


def test_the_completion_estimate_is_taken_at_admission_not_when_queued() -> None:
    """Requests queued behind the first must reserve what was learned from it, not the prior."""
    clock = ManualClock()

    async def go() -> list[int]:
        lim = RateLimiter(concurrency=1, tpm=600_000, headroom=1.0, clock=clock, completion=CompletionEstimate(32768))
        lim._tok_level = 10_000.0
        first = await lim.acquire(10)
        assert first.reserved_tokens == 10 + 1024  # the prior
        waiters = [asyncio.ensure_future(lim.acquire(10)) for _ in range(3)]  # queued behind the slot
        await asyncio.sleep(0.01)
        lim.release(first, 60, completion_tokens=50)
        reserved = []
        for w in waiters:
            p = await asyncio.wait_for(w, 1)
            reserved.append(p.reserved_tokens)
            lim.release(p, 60, completion_tokens=50)
        return reserved

    assert run(go()) == [60, 60, 60]


def test_sparse_overload_429s_never_cut_the_shared_rate_but_clustered_ones_do() -> None:
    """An overload says the server is busy: one in 200 costs that request's backoff, not the job's pace."""
    clock = FakeClock()
    lim = RateLimiter(concurrency=100, clock=clock)

    async def attempts(n: int, overload_every: int) -> None:
        for i in range(n):
            permit = await lim.acquire()
            lim.release(permit)
            if i % overload_every == overload_every - 1:
                lim.cool_down(1.0, overload=True)
            clock.t += 0.005  # 200 attempts a second

    asyncio.run(attempts(2000, 200))
    assert (lim.share, lim.cuts, lim.rate_limited) == (1.0, 0, 10)
    asyncio.run(attempts(1000, 3))  # for 5 s a third of the attempts overloaded: a real capacity problem
    assert lim.cuts >= 1 and lim.share < 1.0
