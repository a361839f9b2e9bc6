"""One rate limiter for every worker: concurrency, requests per minute, tokens per minute.

No polling: a waiter computes when the capacity it needs will be there and sleeps until
then. The clock is injected (:class:`Clock`), so the limiter is tested without real sleeps.

- **Requests** come from a token bucket filled at ``rpm / 60`` per second, holding at most
  a quarter second's worth (at least one request): the rate holds over any one-minute window
  and there is no burst at second zero. It starts nearly empty (a smooth start).
- **Tokens** come from a second bucket filled at ``tpm / 60`` per second. A request reserves
  an *estimate*: its prompt estimate plus the mean completion seen so far
  (:class:`CompletionEstimate`), taken at the moment it is admitted, so requests queued before
  anything was learned do not carry the prior. :meth:`RateLimiter.release` reconciles it with
  the real usage: an overrun becomes debt that later requests wait out, an underrun is given
  back and wakes the waiters.
- **The server's minute, mirrored** (:class:`TokenWindow`): a server that counts a prompt
  when it admits a request and its completion when it answers, over a sliding minute (the
  simulator does; TokenHub's way is not published), refuses a request only while that minute
  is full. The limiter keeps the same count (prompts when sent, completions when they come
  back, over a minute and a second: the second covers the trip to the server) and holds a
  request while it is full. The bucket then reserves the mean and may run ahead, since the
  mirror, not the bucket, keeps the server's minute under the limit: long answers land
  minutes after they were sent, in bursts no reservation foresees, and while such a burst
  fills the minute the bucket must keep what it could not send, to send it when the minute
  empties, or the limit is left partly unused (85% of it, with a bucket of 5 s, on Kimi's
  heavy-tailed thinking answers). It holds twice the mean time a request takes (the lag
  between sending tokens and the server counting them), at least ``_WINDOW_BURST_S`` and at
  most ``_WINDOW_BURST_MAX_S``; a rate-limit 429 empties it. ``window=False`` (Ray's
  cluster-wide lease, which sees no answers) keeps the bucket alone, holding a quarter second.
- **Rate-limit 429s** pause every worker together (:meth:`RateLimiter.cool_down`), and cut
  the rate and concurrency by ``decrease_factor`` (at most once per cool-down); the share then
  climbs back linearly, ``recovery_per_s`` of the configured rate each second (AIMD). The cut
  is 0.9 when the job states its rpm or tpm (the pacing is already near the limit, a 429 means
  a small overshoot) and 0.7 when it paces blind.
- **Overload 429s** (``engine_overloaded_error``), and 429s whose Retry-After is a second or
  two, pace one request, not the account: the engine backs off that one request, and the
  shared rate is cut only when they cluster: at least ``overload_cluster_min`` of them, and
  ``overload_cluster_share`` of the attempts (those in flight included), over the last
  ``overload_window_s`` seconds (decaying counts). Sparse ones cost one request's wait, never
  the whole job's pace.
- The configured rates are multiplied by ``headroom`` (0.99): a server counting a sliding
  minute sees a little network jitter as a burst.

``rpm = 0`` or ``tpm = 0`` means no client-side cap on that dimension; 429s still adapt the
concurrency.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any, Protocol

_EPS = 1e-6  # refills land a hair short of whole units in floating point
_BURST_S = 0.25  # a bucket holds this many seconds of its rate: bursts stay within the headroom
_WINDOW_BURST_S = 5.0  # ... or at least this many, when the mirrored minute guards the server's (see above)
_WINDOW_BURST_MAX_S = 120.0
WINDOW_S = 61.0  # the server's sliding minute, and a second for the trip: its count ends later


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Limiter(Protocol):
    """What the engine needs of a scheduler's limiter; another one (a cluster-wide one, say)
    can be handed to :class:`~batchkimi.execution.row.RowEngine` in its place.

    Every permit that :meth:`acquire` returns is released exactly once, whatever happens to
    its request (the engine releases it in a ``finally``)."""

    async def acquire(self, prompt_tokens: int = 0) -> Any: ...

    def release(self, permit: Any, actual_tokens: int | None = None, completion_tokens: int | None = None) -> None: ...

    def cool_down(self, delay_s: float, *, overload: bool = False) -> None: ...

    def pause(self, delay_s: float) -> None: ...

    # Optional: ``pace(delay_s)`` for a 429 with a short Retry-After (else ``cool_down(...,
    # overload=True)`` is called), and a ``clustered`` property (else such 429s never count as a
    # cluster): :class:`RateLimiter` has both.


class CompletionEstimate:
    """The expected completion length: the mean of what was seen, before that a prior.

    The prior is ``min(max_tokens, prior_tokens)``: reserving the worst case (``max_tokens``,
    32k with thinking) would leave most of a TPM quota idle.
    """

    def __init__(self, max_tokens: int | None, prior_tokens: int = 1024, window: int = 200) -> None:
        self.max_tokens = max_tokens
        self.value = float(min(max_tokens or prior_tokens, prior_tokens))
        self._n = 0
        self._window = window

    def observe(self, completion_tokens: int) -> None:
        self._n += 1
        weight = 1.0 / min(self._n, self._window)  # plain mean first, then a moving one
        self.value += (completion_tokens - self.value) * weight

    def tokens(self) -> int:
        v = int(self.value + 0.5)
        return min(v, self.max_tokens) if self.max_tokens else v


class Permit:
    __slots__ = ("reserved_tokens", "released", "sent")

    def __init__(self, reserved_tokens: int, sent: list[float] | None = None) -> None:
        self.reserved_tokens = reserved_tokens
        self.released = False
        self.sent = sent  # the mirrored window's entry for this request's prompt


class TokenWindow:
    """The tokens a server counts over its sliding minute: each entry ``[time, tokens]``.

    A prompt's entry is corrected when its request ends (the real prompt size; none when a
    429 said it was not admitted); a completion is added when it comes back."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.entries: deque[list[float]] = deque()
        self.total = 0.0

    def expire(self, now: float) -> None:
        edge = now - self.window_s
        entries = self.entries
        while entries and entries[0][0] <= edge:
            self.total -= entries.popleft()[1]

    def add(self, now: float, tokens: float) -> list[float]:
        entry = [now, float(tokens)]
        self.entries.append(entry)
        self.total += tokens
        return entry

    def correct(self, entry: list[float], tokens: float, now: float) -> None:
        if entry[0] > now - self.window_s:  # still counted
            self.total += tokens - entry[1]
        entry[1] = float(tokens)

    def wait_for(self, room: float, limit: float, now: float) -> float:
        """Seconds until ``room`` tokens fit under ``limit`` (0: they do now). An empty window
        always has room: a prompt bigger than the limit goes alone."""
        excess = self.total + min(room, limit) - limit
        if excess <= _EPS * max(limit, 1.0):
            return 0.0
        for t, tokens in self.entries:
            excess -= tokens
            if excess <= _EPS * max(limit, 1.0):
                return max(t + self.window_s - now, 1e-3)
        return 1e-3  # only rounding left


class RateLimiter:
    def __init__(
        self,
        *,
        concurrency: int,
        rpm: float = 0,
        tpm: float = 0,
        clock: Clock | None = None,
        headroom: float = 0.99,
        decrease_factor: float | None = None,
        min_share: float = 0.05,
        recovery_per_s: float = 1 / 60,
        completion: CompletionEstimate | None = None,
        overload_window_s: float = 5.0,
        overload_cluster_min: float = 3.0,
        overload_cluster_share: float = 0.1,
        window: bool = True,
    ) -> None:
        self.clock = clock or MonotonicClock()
        self.completion = completion
        self.concurrency = concurrency
        self.rpm = rpm
        self.tpm = tpm
        self.headroom = headroom
        self.decrease_factor = decrease_factor if decrease_factor is not None else (0.9 if rpm or tpm else 0.7)
        self.min_share = min_share
        self.recovery_per_s = recovery_per_s
        self.share = 1.0  # AIMD share of the configured rates and concurrency
        now = self.clock.now()
        self._last = now
        self._req_level = min(1.0, self._req_capacity)  # one request may go at once
        self._tok_level = 0.0  # tokens start empty: no burst at second zero
        self.window = TokenWindow() if window and tpm else None
        self.latency_s = 0.0  # the mean time a request takes (a moving mean), for the bucket's size
        self._cool_until = now
        self._last_decrease = -1e18
        self.in_flight = 0
        self._lock = asyncio.Lock()
        self._released = asyncio.Event()
        self.rate_limited = 0  # 429s of any kind
        self.cuts = 0  # times the shared rate was cut
        self.overload_window_s = overload_window_s
        self.overload_cluster_min = overload_cluster_min
        self.overload_cluster_share = overload_cluster_share
        self._recent_at = now
        self._recent_done = 0.0  # attempts released, decaying over overload_window_s
        self._recent_overloads = 0.0
        self._released_since = 0  # releases not yet folded into _recent_done (kept cheap)
        self.pace_factor = 0.95  # a short Retry-After's cut of the shared rate (at most once a second)
        self._last_pace = -1e18

    # ---- rates ---------------------------------------------------------------------
    @property
    def _req_rate(self) -> float:  # per second
        return self.rpm / 60 * self.headroom * self.share

    @property
    def _req_capacity(self) -> float:
        return max(1.0, self.rpm / 60 * self.headroom * _BURST_S)

    @property
    def _tok_rate(self) -> float:
        return self.tpm / 60 * self.headroom * self.share

    @property
    def _tok_capacity(self) -> float:
        if self.window is None:
            return self.tpm / 60 * self.headroom * _BURST_S
        burst = min(_WINDOW_BURST_MAX_S, max(_WINDOW_BURST_S, 2 * self.latency_s))
        return self.tpm / 60 * self.headroom * burst

    @property
    def concurrency_cap(self) -> int:
        return max(1, int(self.concurrency * self.share))

    def _refill(self, now: float) -> None:
        dt = now - self._last
        if dt <= 0:
            return
        self._last = now
        if now > self._cool_until and self.share < 1.0:
            # additive increase, counted from the end of the cool-down
            grow_from = max(self._cool_until, now - dt)
            self.share = min(1.0, self.share + (now - grow_from) * self.recovery_per_s)
        if self.rpm:
            self._req_level = min(self._req_capacity, self._req_level + dt * self._req_rate)
        if self.tpm:
            self._tok_level = min(self._tok_capacity, self._tok_level + dt * self._tok_rate)

    # ---- acquire / release -----------------------------------------------------------
    async def acquire(self, prompt_tokens: int = 0) -> Permit:
        """Wait for a slot, a request and the tokens it is expected to use (``prompt_tokens``
        plus the expected completion); the permit must be released."""
        async with self._lock:
            while True:
                tokens = prompt_tokens + self.completion.tokens() if self.tpm and self.completion else prompt_tokens
                now = self.clock.now()
                self._refill(now)
                if now < self._cool_until:
                    await self.clock.sleep(self._cool_until - now)
                    continue
                if self.in_flight >= self.concurrency_cap:
                    self._released.clear()
                    await self._released.wait()
                    continue
                wait = 0.0
                if self.rpm and self._req_level < 1.0 - _EPS:
                    wait = (1.0 - self._req_level) / self._req_rate
                if self.tpm and tokens:
                    need = min(float(tokens), self._tok_capacity)  # a bigger one goes into debt
                    if self._tok_level < need - _EPS * need:
                        wait = max(wait, (need - self._tok_level) / self._tok_rate)
                window = self.window
                if window is not None:
                    window.expire(now)
                    wait = max(wait, window.wait_for(prompt_tokens, self.tpm * self.headroom * self.share, now))
                if wait > 0:
                    await self._sleep_or_wake(max(wait, 1e-4), woken_by_release=bool(self.tpm and tokens))
                    continue
                if self.rpm:
                    self._req_level -= 1.0
                if self.tpm:
                    self._tok_level -= tokens
                self.in_flight += 1
                return Permit(tokens, window.add(now, prompt_tokens) if window is not None else None)

    async def _sleep_or_wake(self, seconds: float, *, woken_by_release: bool) -> None:
        """Sleep ``seconds``, or less if a release reconciles tokens (an estimate's debt forgiven)."""
        if not woken_by_release:
            await self.clock.sleep(seconds)
            return
        self._released.clear()
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        waker = asyncio.ensure_future(self._released.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    def release(self, permit: Permit, actual_tokens: int | None = None, completion_tokens: int | None = None) -> None:
        """Give the slot back; reconcile the tokens reserved with those used (None: keep the
        estimate), and learn the completion length."""
        if permit.released:
            return
        permit.released = True
        self.in_flight -= 1
        self._released_since += 1
        if completion_tokens is not None and self.completion is not None:
            self.completion.observe(completion_tokens)
        if self.tpm and actual_tokens is not None:
            now = self.clock.now()
            self._refill(now)
            self._tok_level -= actual_tokens - permit.reserved_tokens
            if self.window is not None and permit.sent is not None:
                self.latency_s += (now - permit.sent[0] - self.latency_s) * 0.05
                completion = completion_tokens or 0
                self.window.correct(permit.sent, max(0, actual_tokens - completion), now)
                if completion:
                    self.window.add(now, completion)
        self._released.set()

    # ---- adapting ----------------------------------------------------------------------
    def _decay(self, now: float) -> None:
        """Fold the releases since the last overload in (as if they came now: a cheap, slightly
        generous count), then let both counts decay over ``overload_window_s``."""
        dt = now - self._recent_at
        if dt > 0:
            f = math.exp(-dt / self.overload_window_s)
            self._recent_done *= f
            self._recent_overloads *= f
            self._recent_at = now
        self._recent_done += self._released_since
        self._released_since = 0

    def cool_down(self, delay_s: float, *, overload: bool = False) -> None:
        """A 429: every worker waits ``delay_s``; rates and concurrency drop (once per cool-down).
        An ``overload`` 429 does so only when overloads cluster (see the module docstring)."""
        now = self.clock.now()
        self.rate_limited += 1
        if overload:
            self._decay(now)
            self._recent_overloads += 1
            # the share of recent attempts, those still in flight included: at the start of a run
            # few have ended, and a handful of early 429s are not yet a cluster
            attempts = self._recent_done + self.in_flight
            clustered = (self._recent_overloads >= self.overload_cluster_min
                         and self._recent_overloads >= self.overload_cluster_share * max(attempts, 1.0))
            if not clustered:
                return
        self._refill(now)
        self._cool_until = max(self._cool_until, now + delay_s)
        if now - self._last_decrease >= max(1.0, delay_s):
            self._last_decrease = now
            self.cuts += 1
            self.share = max(self.min_share, self.share * self.decrease_factor)
            self._req_level = min(self._req_level, 0.0)
            self._tok_level = min(self._tok_level, 0.0)

    def pace(self, delay_s: float) -> None:
        """A 429 with a short Retry-After: it paces the request it answered (which waits
        ``delay_s`` itself). The shared rate learns slowly: a ``pace_factor`` cut at most once a
        second, no pause; when such 429s cluster, the full cut and pause of :meth:`cool_down`."""
        now = self.clock.now()
        self._refill(now)
        if now - self._last_pace >= 1.0:
            self._last_pace = now
            self.share = max(self.min_share, self.share * self.pace_factor)
        self.cool_down(delay_s, overload=True)

    @property
    def clustered(self) -> bool:
        """Whether recent overloads and short-wait 429s are a cluster (see :meth:`cool_down`)."""
        self._decay(self.clock.now())
        attempts = self._recent_done + self.in_flight
        return (self._recent_overloads >= self.overload_cluster_min
                and self._recent_overloads >= self.overload_cluster_share * max(attempts, 1.0))

    def pause(self, delay_s: float) -> None:
        """Wait ``delay_s`` without cutting the rate (a server said its window is spent)."""
        self._cool_until = max(self._cool_until, self.clock.now() + delay_s)
