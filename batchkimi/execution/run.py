"""One run of a job: :class:`Run` owns what is the same however the requests are sent: the
plan, the one writer, the summary, the budget, signals and the stop. An :class:`Executor`
(:class:`~batchkimi.execution.local.LocalExecutor`, or
:class:`~batchkimi.execution.ray.RayExecutor` on a cluster) sends the plan's rows and hands each
result to :meth:`Run.deliver`.

Every task lives in one :class:`asyncio.TaskGroup` (the writer beside the executor), so no
task's failure goes unawaited and cancelling the run ends every task. A row's failure is a
row; anything else that goes wrong while rows are handled (a hook that raises, a reader that
hits a damaged file, a bug) stops the run like Ctrl-C: requests in flight get their grace
period, what is done is written, and the run raises a :class:`~batchkimi.errors.JobError`
naming the row.

A stop (a signal, a job-level API refusal, the budget, an account told to wait, an error, the
caller's ``stop`` event) sends nothing new: rows waiting for the limiter, a back-off or the
queue are dropped at once (they are pending: the next run sends them), and only requests
already in flight get ``grace_s`` seconds to finish. A second signal, or the end of the grace
period, cancels those too.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections import Counter
from typing import Any, Protocol

from ..config import Job, job_notices
from ..errors import ConfigError, JobError
from ..events import Hook, Notice, RowFinished, RunStarted, SafeHook, Stopping, no_hook
from ..output.sink import Sink
from ..policy.budget import BudgetGate
from .plan import Plan, open_plan
from .resume import manifest_of
from .rows import LineBudgetNotes
from .summary import Summary, resume_time

_END = object()  # the results queue's last item
_TICK = object()  # wakes the writer to fsync the journal


class Executor(Protocol):
    """Sends a run's pending rows; see the module docstring."""

    async def execute(self, run: Run) -> None:
        """Send every row of ``run.plan`` still to send; hand each result to ``await run.deliver(row)``.
        Return when all are done, or soon after :meth:`stop`."""
        ...

    def stop(self, run: Run) -> None:
        """Send nothing new from now on (called once, on the event loop)."""
        ...

    def abort(self) -> None:
        """The grace period is over: cancel what is still in flight."""
        ...


class Run:
    """One run of ``job`` over its output directory, its rows sent by ``executor``. Use
    :meth:`execute` once."""

    def __init__(self, job: Job, executor: Executor, *, hook: Hook = no_hook, overwrite: bool = False,
                 install_signal_handlers: bool = False, stop: asyncio.Event | None = None) -> None:
        if not job.output:
            raise ConfigError("no output: set 'output' in the job file or pass --output")
        self.job = job
        self.executor = executor
        self.hook = SafeHook(hook, self._hook_failed)
        self.overwrite = overwrite
        self.install_signal_handlers = install_signal_handlers
        self.external_stop = stop
        self.sink = Sink(job.output, job.keep_columns, job.rows_per_part, storage=dict(job.storage))
        self.started = time.monotonic()
        self.stopping = False
        self.error: BaseException | None = None  # raised after the run wrote what it could
        self.fatal: str | None = None
        self.signals = 0
        self.closed = False  # the executor is done: the writer may finish
        self.summary = Summary(self.sink.location, 0, 0)
        self.gate = BudgetGate(0.0, 0, job.price_table, job.model)
        self.budget_lines = LineBudgetNotes(job, self.hook)
        self.results: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(2 * job.concurrency, 1024))
        self._grace: asyncio.TimerHandle | None = None
        self.plan: Plan | None = None

    # ---- stopping ------------------------------------------------------------------------
    def stop(self, reason: str, *, error: BaseException | None = None, fatal: str | None = None) -> None:
        """Send nothing new; give requests in flight ``grace_s``; remember why."""
        if error is not None and self.error is None:
            self.error = error
        if fatal is not None and self.fatal is None:
            self.fatal = fatal
        if self.stopping:
            return
        self.stopping = True
        self.hook(Stopping(reason))
        self.executor.stop(self)
        self._grace = asyncio.get_running_loop().call_later(self.job.grace_s, self.executor.abort)

    def wait_for_account(self, until_epoch_s: float, message: str) -> None:
        """A quota asked the account to wait past ``max_wait_s``: stop, resumable (exit 6)."""
        s = self.summary
        if s.wait_until is None:
            s.wait_until, s.wait_reason = until_epoch_s, message
        self.stop(f"the server asks this account to wait until {resume_time(until_epoch_s)}")

    def at_budget(self, why: str) -> None:
        if self.summary.budget_stop is None:
            self.summary.budget_stop = why
        self.stop(f"stopping at the budget: {why}")

    def _on_signal(self) -> None:
        self.signals += 1
        self.summary.interrupted = True
        if self.signals == 1:
            self.stop(f"interrupted: finishing requests in flight for up to {self.job.grace_s:g}s (again to stop now)")
        else:
            self.executor.abort()

    def _hook_failed(self, exc: BaseException) -> None:
        self.stop(f"the progress hook raised {exc!r}", error=JobError(f"the progress hook raised {type(exc).__name__}: {exc}"))

    async def _watch(self, event: asyncio.Event) -> None:
        """The caller's stop event; cancelled when the executor is done."""
        await event.wait()
        self.summary.interrupted = True
        self.stop("stopped by the caller")

    # ---- the run ---------------------------------------------------------------------------
    async def execute(self) -> Summary:
        job, sink = self.job, self.sink
        plan = self.plan = await open_plan(job, sink, overwrite=self.overwrite)
        try:
            usd, tokens, self.counted_through = plan.spent
            self.gate = BudgetGate(job.max_cost_usd, job.max_total_tokens, job.price_table, job.model, usd, tokens)
            unsendable = plan.limit - plan.already - plan.to_send
            self.summary = Summary(sink.location, plan.limit - unsendable, plan.already)
            if plan.folder is not None:
                self.summary.notes = plan.folder.lines()
                plan.folder.entries = []  # the index is on disk; a dict per file is not kept for the run
            self.manifest = manifest_of(job, plan.path, plan.fmt, plan.scan, plan.manifest, "running", folder=plan.folder,
                                        history=plan.history, spend=self._spend())
            sink.write_manifest(self.manifest)
            self.hook(RunStarted(plan.limit, plan.already, plan.limit - plan.already))
            for note in job_notices(job):
                self.hook(Notice(note))
                self.summary.notes.append(f"warning: {note}")
            await self._run()
            return await self._close()
        finally:
            with contextlib.suppress(OSError):
                sink.journal.close()  # after a cancellation: the next run converts it
            sink.unlock()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        installed = []
        if self.install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._on_signal)
                    installed.append(sig)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._write(), name="batchkimi-writer")
                group.create_task(self._produce(), name="batchkimi-producer")
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            if self._grace is not None:
                self._grace.cancel()

    async def _produce(self) -> None:
        """The executor (and the caller's stop watcher); when it is done, the writer may finish."""
        try:
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(self._watch(self.external_stop)) if self.external_stop is not None else None
                try:
                    await self.executor.execute(self)
                finally:
                    if watcher is not None:
                        watcher.cancel()
        except Exception as exc:  # noqa: BLE001 - a bug in a task: stop, write what is done, then raise it
            self.error = self.error or first_error(exc)
        finally:
            self.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.results.put_nowait(_END)

    # ---- results -----------------------------------------------------------------------------
    def account(self, row: dict[str, Any]) -> None:
        """Count a finished row in the summary and tell the hook."""
        self.summary.add_row(row)
        self.hook(RowFinished(row["status"], row.get("total_tokens") or 0, row.get("attempts") or 0))

    async def deliver(self, row: dict[str, Any], *, counted: bool = False) -> None:
        """A finished row to the writer (counted first, unless the caller already did)."""
        if not counted:
            self.account(row)
        await self.results.put(row)

    async def _write(self) -> None:
        """The one writer: journal each batch at once, fsync at least every second while anything
        is unsynced (a tick one second after the first unsynced write wakes it even when no
        result comes), roll a full (or old) segment into a part."""
        job, sink, q = self.job, self.sink, self.results
        loop = asyncio.get_running_loop()
        last_roll = last_sync = time.monotonic()
        tick: asyncio.TimerHandle | None = None

        def wake() -> None:
            nonlocal tick
            tick = None
            with contextlib.suppress(asyncio.QueueFull):  # full: the writer is awake anyway
                q.put_nowait(_TICK)

        try:
            while True:
                if q.empty() and self.closed:
                    return
                batch = [await q.get()]
                while not q.empty():
                    batch.append(q.get_nowait())
                end = _END in batch
                rows = [r for r in batch if r is not _END and r is not _TICK]
                full = sink.append(rows)
                now = time.monotonic()
                if full or (rows and now - last_roll >= job.flush_interval_s):
                    await asyncio.to_thread(sink.roll)
                    last_roll = last_sync = now
                elif sink.unsynced and now - last_sync >= 1.0:
                    await asyncio.to_thread(sink.sync)
                    last_sync = now
                if sink.unsynced and tick is None:
                    tick = loop.call_at(loop.time() + max(0.0, last_sync + 1.0 - now), wake)
                if end:
                    return
        finally:
            if tick is not None:
                tick.cancel()

    # ---- the end ------------------------------------------------------------------------------
    def _spend(self, through: int | None = None) -> dict[str, Any]:
        """The output's spend for the manifest: every run's, and the last part it counts."""
        return {"usd": round(self.gate.spent_usd, 8), "tokens": self.gate.spent_tokens,
                "through_part": self.counted_through if through is None else through}

    async def _close(self) -> Summary:
        job, sink, summary, plan = self.job, self.sink, self.summary, self.plan
        assert plan is not None
        await asyncio.to_thread(sink.close)
        below = plan.limit if job.limit is not None else None
        if summary.run_status and len(sink.state.latest_rows):
            # Rows written before this run may now be superseded: rewrite those parts.
            sink.compact(plan.scan.rows * job.samples)
            summary.final_status = sink.status_counts(below=below)
        else:
            # Nothing older to supersede (a fresh run, or one that sent nothing): no need to re-read.
            final = Counter(sink.status_counts(below=below))
            final.update(summary.run_status)
            summary.final_status = dict(final)
        summary.notes.extend(self.budget_lines.lines())
        summary.notes.extend(self.gate.lines())
        summary.wall_s = time.monotonic() - self.started
        summary.fatal = self.fatal
        if self.hook.error is not None and self.error is None:
            self.error = JobError(f"the progress hook raised {type(self.hook.error).__name__}: {self.hook.error}")
        state = ("failed" if self.error or self.fatal else "interrupted" if summary.interrupted
                 else "waiting for the account" if summary.wait_until is not None
                 else "stopped at the budget" if summary.budget_stop else "finished")
        sink.write_manifest(manifest_of(job, plan.path, plan.fmt, plan.scan, self.manifest, state, summary, plan.folder,
                                        plan.history, spend=self._spend(through=sink.last_part)))
        if self.error is not None:
            raise self.error
        return summary


def first_error(eg: BaseException) -> BaseException:
    """The first real error in an exception group (a JobError first), as a JobError."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(eg)
    for e in leaves:
        if isinstance(e, JobError):
            return e
    for e in leaves:
        if not isinstance(e, asyncio.CancelledError):
            return JobError(f"internal error: {type(e).__name__}: {e}")
    return leaves[0] if leaves else JobError(str(eg))
