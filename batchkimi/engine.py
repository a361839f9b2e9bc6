"""The engine's public doors: :func:`run` (sync), :func:`run_async`, :func:`dry_run`.

- :class:`~batchkimi.rowengine.RowEngine` sends *one* prepared request with its retries
  through the shared limiter and returns its result row: the door for other schedulers.
- :class:`~batchkimi.runner.JobRun` is the whole job: scan the input, open the output
  (resuming), feed rows through a bounded queue to ``concurrency`` workers, and hand every
  result to the one writer task, all in one task group.

Ctrl-C or SIGTERM (when ``install_signal_handlers``): send nothing new, give requests in
flight ``grace_s`` seconds, write what is done, return ``Summary.interrupted``. A second
signal skips the grace period.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from .config import Job, resolve_api_key
from .events import Hook, no_hook
from .ratelimit import CompletionEstimate
from .reader import read_rows
from .rowengine import RowAbandoned, RowEngine
from .runner import JobRun, check_resume, open_input, prepare_row, refuse_foreign_output
from .sink import Sink
from .summary import DryRunReport, Summary

__all__ = ["RowAbandoned", "RowEngine", "Summary", "dry_run", "run", "run_async"]


def dry_run(job: Job) -> DryRunReport:
    """Check every row, count each status, render the first request; send nothing (and so
    need no API key)."""
    sink = Sink(Path(job.output), job.keep_columns) if job.output else None
    if sink is not None:
        refuse_foreign_output(sink.dir)
    manifest = sink.read_manifest() if sink is not None and sink.dir.exists() else None
    path, fmt, scan = open_input(job, manifest)
    if sink is not None and manifest:
        check_resume(manifest, job, scan, sink.dir)
    done = sink.compact(scan.rows, rewrite=False).done if sink is not None and manifest else None
    status: Counter[str] = Counter()
    invalid: list[str] = []
    first: dict[str, Any] | None = None
    prompt_tokens = 0
    limit = job.limit if job.limit is not None else scan.rows
    for batch in read_rows(path, fmt):
        for row in batch:
            if row.pos >= limit:
                break
            rid, prepared = prepare_row(row, job, fmt, scan)
            if isinstance(prepared, str):
                status["invalid"] += 1
                if len(invalid) < 5:
                    invalid.append(prepared)
                continue
            if done is not None and row.pos < len(done) and done[row.pos]:
                status["already_done"] += 1
                continue
            status["to_send"] += 1
            prompt_tokens += prepared.prompt_tokens_estimate
            if first is None:
                first = {
                    "url": (job.base_url.rstrip("/") + "/chat/completions") if not job.uses_simulator else "simulator",
                    "headers": {"Authorization": "Bearer ***", "Content-Type": "application/json"},
                    "id": rid,
                    "body": prepared.body,
                }
    est = CompletionEstimate(job.effective_max_tokens)
    return DryRunReport(
        total_rows=min(limit, scan.rows),
        already_done=int(done.sum()) if done is not None else 0,
        status=status,
        invalid_examples=invalid,
        first_request=first,
        prompt_tokens_estimate=prompt_tokens,
        expected_completion_tokens=est.tokens(),
        max_completion_tokens=job.effective_max_tokens,
        prices=job.prices,
        model=job.model,
    )


async def run_async(
    job: Job,
    *,
    hook: Hook = no_hook,
    api_key: str | None = None,
    overwrite: bool = False,
    install_signal_handlers: bool = False,
    stop: asyncio.Event | None = None,
    transport: Any = None,
) -> Summary:
    """Run a whole job; see the module docstring. Raises a :class:`~batchkimi.errors.JobError`
    for a job-level problem (after writing what is done); failed rows are rows, not exceptions.
    Cancelling it ends every task it started.

    ``transport`` replaces the HTTP transport (anything with ``async complete(body, *, stream,
    payload)`` returning a :class:`~batchkimi.client.Reply`): for benchmarks of the engine alone."""
    key = api_key or resolve_api_key(job)  # before the dataset is read
    return await JobRun(job, key, hook=hook, overwrite=overwrite, install_signal_handlers=install_signal_handlers,
                        stop=stop, transport=transport).execute()


def run(job: Job, **kwargs: Any) -> Summary:
    """Run a job to the end and return its :class:`Summary` (a sync door over :func:`run_async`)."""
    return asyncio.run(run_async(job, **kwargs))
