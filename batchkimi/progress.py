"""The CLI's progress bar: a hook that turns engine events into a tqdm line on stderr.

Shows rows done of total, ok / failed, live requests and tokens per minute (over the last
60 seconds) against the job's limits, requests in flight, retries and 429s, and a countdown
while the server asked every request to wait.
"""

from __future__ import annotations

import sys
import time
from collections import deque

from tqdm import tqdm

from .events import (
    AttemptFinished,
    AttemptStarted,
    Event,
    Notice,
    RowFinished,
    RunStarted,
    Stopping,
    Waiting,
)


class ProgressBar:
    def __init__(self, rpm_limit: float = 0, tpm_limit: float = 0, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.rpm_limit, self.tpm_limit = rpm_limit, tpm_limit
        self.bar: tqdm | None = None
        self.ok = self.failed = self.retries = self.rate_limited = 0
        self.in_flight = 0
        self._window: deque[tuple[float, int]] = deque()  # (time, tokens) per attempt
        self._tokens = 0
        self._last_draw = 0.0
        self._started = time.monotonic()
        self.waiting_until = 0.0  # epoch seconds: every request waits for the server until then
        self.waiting_reason = ""

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            if self.enabled:
                self.bar = tqdm(total=event.to_send, unit="row", file=sys.stderr, dynamic_ncols=True,
                                desc="batchkimi", smoothing=0.05)
            return
        if isinstance(event, AttemptStarted):
            self.in_flight += 1
            return
        if isinstance(event, AttemptFinished):
            self.in_flight -= 1
            now = time.monotonic()
            self._window.append((now, event.tokens))
            self._tokens += event.tokens
            if event.http_status == 429:
                self.rate_limited += 1
            if event.retry_in_s is not None:
                self.retries += 1
        elif isinstance(event, RowFinished):
            if event.status == "ok":
                self.ok += 1
            else:
                self.failed += 1
            if self.bar is not None:
                self.bar.update(1)
        elif isinstance(event, Stopping):
            self._say(f"stopping: {event.reason}")
        elif isinstance(event, Notice):
            self._say(f"warning: {event.message}")
        elif isinstance(event, Waiting):
            self.waiting_until, self.waiting_reason = event.until_epoch_s, event.reason
            self._last_draw = 0.0
        self._draw()

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def _draw(self) -> None:
        now = time.monotonic()
        if self.bar is None or now - self._last_draw < 0.5:
            return
        self._last_draw = now
        while self._window and self._window[0][0] < now - 60:
            self._tokens -= self._window.popleft()[1]
        span = min(60.0, max(1.0, now - self._started))
        rpm = len(self._window) * 60 / span
        tpm = self._tokens * 60 / span
        rpm_s = f"{rpm:.0f}" + (f"/{self.rpm_limit:.0f}" if self.rpm_limit else "")
        tpm_s = f"{tpm / 1000:.1f}k" + (f"/{self.tpm_limit / 1000:.0f}k" if self.tpm_limit else "")
        left = self.waiting_until - time.time()
        wait = f" waiting {left:.0f}s ({self.waiting_reason})" if left >= 1 else ""
        self.bar.set_postfix_str(
            f"ok={self.ok} fail={self.failed} rpm={rpm_s} tpm={tpm_s} in-flight={self.in_flight} "
            f"retries={self.retries} 429s={self.rate_limited}{wait}",
            refresh=wait != "",
        )

    def close(self) -> None:
        if self.bar is not None:
            self._last_draw = 0
            self._draw()
            self.bar.close()
            self.bar = None
