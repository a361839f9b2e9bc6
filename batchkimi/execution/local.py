"""The local executor: this process sends a run's rows, ``concurrency`` at a time.

One task group holds the feeder (it reads the plan's pending rows, prepares each, and queues
it; a row with local media is prepared in a thread, since that reads file headers) and the
workers (each takes a row, waits for the budget, and sends it through one
:class:`~batchkimi.execution.row.RowEngine` and the job's one limiter). Queues are bounded:
memory stays flat whatever the dataset's size. A stop cancels the feeder and every worker not
in flight or handing over a paid answer; the grace period's end cancels the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import FatalAPIError, JobError
from ..input.reader import SourceRow, read_rows
from ..output.results import invalid_row
from ..policy.breaker import FailureBreaker
from ..request import Prepared
from .row import (
    AccountWaiting,
    RowAbandoned,
    RowEngine,
    endpoint,
    limiter_of,
    policy_of,
    sent_max_tokens,
)
from .rows import kept_values, prepare_row, row_has_media, tokens_of

if TYPE_CHECKING:
    from .run import Run

PREPARE_IN_THREAD = 32  # rows with media checked per trip to a worker thread


class LocalExecutor:
    """Sends a run's rows from this process (see the module docstring). ``base_url`` and
    ``ca_pem``: where the requests go, when not the job's own (a simulator started for the run);
    ``transport``: one to use instead (the engine's benchmarks)."""

    def __init__(self, api_key: str, *, base_url: str | None = None, ca_pem: bytes | None = None,
                 transport: Any = None) -> None:
        self.key = api_key
        self.base_url, self.ca_pem = base_url, ca_pem
        self.transport = transport
        self.engine: RowEngine | None = None
        self.feeder: asyncio.Task[None] | None = None
        self.workers: list[asyncio.Task[None]] = []
        self.delivering: set[asyncio.Task[Any]] = set()
        self.old_max_tokens: dict[int, int] = {}
        self._where = ""

    # ---- the executor protocol ------------------------------------------------------------
    def stop(self, run: Run) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.feeder is not None and self.feeder is not asyncio.current_task():
            self.feeder.cancel()
        me = asyncio.current_task()
        for w in self.workers:
            if w is me or w in self.delivering or (self.engine is not None and w in self.engine.sending):
                continue  # in flight, or handing over a paid answer: the grace period is theirs
            w.cancel()  # waiting for the queue, the limiter, the budget or a back-off: nothing was sent

    def abort(self) -> None:
        for w in self.workers:
            w.cancel()

    async def execute(self, run: Run) -> None:
        plan, job = run.plan, run.job
        assert plan is not None
        self.old_max_tokens = plan.old_max_tokens
        n_workers = max(1, min(job.concurrency, plan.to_send))
        work: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(2 * job.concurrency, 64))
        if self.transport is not None:
            opened: Any = contextlib.nullcontext(self.transport)
        elif self.ca_pem is not None:  # a simulator started with TLS; else the plain call, which wrappers take
            opened = endpoint(job, self.key, self.base_url, ca_pem=self.ca_pem)
        else:
            opened = endpoint(job, self.key, self.base_url)
        async with opened as transport:
            limiter = limiter_of(job)
            self.engine = RowEngine(job, transport, limiter, policy_of(job), hook=run.hook,
                                    breaker=FailureBreaker(job.stop_after_failures))
            if run.stopping:
                self.engine.stop()
            try:
                async with asyncio.TaskGroup() as group:
                    self.feeder = group.create_task(self._feed(run, work, n_workers), name="batchkimi-feeder")
                    self.workers = [group.create_task(self._work(run, work), name=f"batchkimi-worker-{i}")
                                    for i in range(n_workers)]
            finally:
                s = run.summary
                s.requests += self.engine.requests
                s.retries += self.engine.retries
                s.rate_limited += limiter.rate_limited

    # ---- feeding -----------------------------------------------------------------------------
    def _rows_to_send(self, run: Run) -> Iterator[tuple[SourceRow, tuple[int, ...]]]:
        """Input rows with samples not yet done, below the limit, until a stop: each with the
        samples to send (``(0,)`` without samples). Output position: input position x samples + sample."""
        plan = run.plan
        assert plan is not None
        done, limit, k = plan.done, plan.limit, run.job.samples
        for batch in read_rows(plan.path, plan.fmt, skip_until=min(plan.first_pending, limit) // k):
            for row in batch:
                base = row.pos * k
                if base >= limit or run.stopping:
                    return
                if k == 1:
                    if base < len(done) and done[base]:
                        continue
                    pending: tuple[int, ...] = (0,)
                else:
                    pending = tuple(s for s in range(k) if not (base + s < len(done) and done[base + s]))
                    if not pending:
                        continue
                self._where = row.where
                yield row, pending

    async def _feed(self, run: Run, work: asyncio.Queue[Any], n_workers: int) -> None:
        plan, job = run.plan, run.job
        assert plan is not None
        self._where = str(plan.path)
        media, folder, fmt, scan = plan.media, plan.folder is not None, plan.fmt, plan.scan
        held: list[tuple[SourceRow, tuple[int, ...]]] = []  # rows with media, prepared together in a thread

        def prepare_held(rows: list[tuple[SourceRow, tuple[int, ...]]]) -> list[tuple[str, Prepared | str]]:
            out = []
            for r, _ in rows:
                self._where = r.where
                out.append(prepare_row(r, job, fmt, scan, media, folder=folder))
            return out

        async def flush() -> None:
            rows = held[:]
            held.clear()
            for (row, samples), (rid, prepared) in zip(rows, await asyncio.to_thread(prepare_held, rows), strict=True):
                await self._hand_over(run, work, row, rid, prepared, samples)

        try:
            for n, (row, samples) in enumerate(self._rows_to_send(run)):
                if row_has_media(row, media, job):  # reads file headers: not on the event loop
                    held.append((row, samples))
                    if len(held) >= PREPARE_IN_THREAD:
                        await flush()
                    continue
                if held:
                    await flush()
                rid, prepared = prepare_row(row, job, fmt, scan, media)
                await self._hand_over(run, work, row, rid, prepared, samples)
                if n % 1024 == 1023:
                    await asyncio.sleep(0)  # let the workers and the writer in on a fast reader
            if held and not run.stopping:
                await flush()
        except JobError as exc:
            run.stop(str(exc), error=exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug: the job stops, naming the row, which stays pending
            where = self._where
            run.stop(f"stopped at {where}", error=JobError(
                f"stopped at {where}: {type(exc).__name__}: {exc}. The row is still pending: the same command "
                "resumes once the cause is fixed"))
            return
        for _ in range(n_workers):
            await work.put(None)

    async def _hand_over(self, run: Run, work: asyncio.Queue[Any], row: SourceRow, rid: str, prepared: Prepared | str,
                         samples: tuple[int, ...] = (0,)) -> None:
        """A prepared row's samples to the workers; a row that cannot be sent straight to the writer."""
        job = run.job
        k = job.samples
        kept = kept_values(row, job)
        if run.plan is not None and run.plan.fmt == "openai_batch" and not isinstance(prepared, str):
            run.budget_lines.check(prepared, row.where)
        for s in samples:
            pos = row.pos * k + s
            extra = {**kept, "sample": s} if k > 1 else kept
            if isinstance(prepared, str):
                inv = invalid_row(rid, pos, prepared)
                inv.update(extra)
                await run.deliver(inv)
            elif (old := self.old_max_tokens.get(pos)) is not None and (sent_max_tokens(prepared.body) or 0) <= old:
                run.summary.already_done += 1  # truncated at this very budget before: it would truncate again
            else:
                one = dataclasses.replace(prepared, sample=s) if s else prepared
                await work.put((pos, rid, one, extra, row.where))
                run.summary.sent_rows += 1

    # ---- working -------------------------------------------------------------------------------
    async def _work(self, run: Run, work: asyncio.Queue[Any]) -> None:
        engine, gate = self.engine, run.gate
        assert engine is not None
        task = asyncio.current_task()
        budget = gate.active  # no budget: nothing to admit or settle, on every row's path
        held: Any = None
        while not run.stopping:
            item = await work.get()
            if item is None or run.stopping:
                return
            pos, rid, prepared, kept, where = item
            if budget:
                held = await gate.admit(prepared.prompt_tokens_estimate, sent_max_tokens(prepared.body))
                if isinstance(held, str):  # could never fit the budget: this row stays pending
                    run.at_budget(held)
                    return
                if run.stopping:
                    gate.settle(held, 0.0, 0)
                    return
            try:
                row = await engine.process(rid, pos, prepared)
            except BaseException as exc:
                if held is not None:
                    gate.settle(held, 0.0, 0)  # not sent, or cut: what it used is unknown
                if isinstance(exc, RowAbandoned):
                    return
                if isinstance(exc, FatalAPIError):
                    run.stop(str(exc), fatal=str(exc))
                    return
                if isinstance(exc, AccountWaiting):  # the row stays pending: nothing about it failed
                    run.wait_for_account(exc.until_epoch_s, exc.message)
                    return
                if not isinstance(exc, Exception):
                    raise
                run.stop(f"unexpected error on {where}",
                         error=JobError(f"unexpected error on {where} (id {rid}): {type(exc).__name__}: {exc}"))
                return
            row.update(kept)
            run.account(row)
            if held is not None:
                answered = row["status"] in ("ok", "truncated")
                gate.settle(held, row.get("cost_usd") if answered else 0.0, tokens_of(row) if answered else 0)
                held = None
            assert task is not None
            self.delivering.add(task)
            try:
                await run.deliver(row, counted=True)  # a paid answer: never cancelled before it is queued
            finally:
                self.delivering.discard(task)

