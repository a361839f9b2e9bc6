"""The engine's public doors: :func:`run` (sync), :func:`run_async`, :func:`dry_run`.

- :class:`~batchkimi.execution.row.RowEngine` sends *one* prepared request with its retries
  through the shared limiter and returns its result row: the door for other schedulers.
- :class:`~batchkimi.execution.run.JobRun` is the whole job: scan the input, open the output
  (resuming), feed rows through a bounded queue to ``concurrency`` workers, and hand every
  result to the one writer task, all in one task group.

Ctrl-C or SIGTERM (when ``install_signal_handlers``): send nothing new, give requests in
flight ``grace_s`` seconds, write what is done, return ``Summary.interrupted``. A second
signal skips the grace period.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import Job, job_notices, resolve_api_key
from .errors import ConfigError
from .events import Hook, no_hook
from .execution.row import RowAbandoned, RowEngine
from .execution.run import (
    JobRun,
    LineBudgetNotes,
    check_resume,
    input_format,
    media_settings,
    open_folder,
    open_input,
    prepare_row,
    refuse_foreign_output,
)
from .execution.summary import DryRunReport, Summary
from .input.folder import INDEX, FolderScan, read_index, resume_marks
from .input.media import with_marker_note
from .input.reader import read_rows
from .output.parts import ResumeState
from .output.sink import Sink
from .policy.ratelimit import CompletionEstimate

__all__ = ["RowAbandoned", "RowEngine", "Summary", "dry_run", "run", "run_async"]
INVALID_SHOWN = 50  # rows named one by one in a dry run's report


def dry_run(job: Job) -> DryRunReport:
    """Check every row (its images and videos included), count each status, render the first
    request; send nothing (and so need no API key), write nothing."""
    sink = Sink(Path(job.output), job.keep_columns) if job.output else None
    if sink is not None:
        refuse_foreign_output(sink.dir)
    manifest = sink.read_manifest() if sink is not None and sink.dir.exists() else None
    if input_format(job) != "folder":
        path, fmt, scan = open_input(job, manifest)
        if sink is not None and manifest:
            check_resume(manifest, job, scan, sink.dir, path, fmt)
        done = _done(sink.compact(scan.rows, rewrite=False), job) if sink is not None and manifest else None
        return _dry_run(job, path, fmt, scan, done, None)
    if sink is not None and manifest:
        check_resume(manifest, job, None, sink.dir)
    old = read_index(sink.dir / INDEX) if sink is not None and manifest else []
    with tempfile.TemporaryDirectory(prefix="batchkimi-dry-run-") as tmp:
        path, scan, folder = open_folder(job, Path(tmp) / INDEX, old)
        done = _done(sink.compact(scan.rows, rewrite=False), job) if sink is not None and manifest else np.zeros(scan.rows, dtype=bool)
        resume_marks(sink.dir if sink is not None else Path(tmp), folder, done)
        return _dry_run(job, path, "jsonl", scan, done, folder)


def _done(state: ResumeState, job: Job) -> np.ndarray:
    return state.apply_rerun(frozenset(job.retry), job.effective_max_tokens)


def _dry_run(job: Job, path: Path, fmt: str, scan: Any, done: Any, folder: FolderScan | None) -> DryRunReport:
    status: Counter[str] = Counter()
    invalid: list[str] = []
    first: dict[str, Any] | None = None
    prompt_tokens = 0
    media = media_settings(job, folder=folder is not None)
    limit = job.limit if job.limit is not None else scan.rows
    lines = LineBudgetNotes(job)
    for batch in read_rows(path, fmt):
        for row in batch:
            if row.pos >= limit:
                break
            if done is not None and row.pos < len(done) and done[row.pos]:
                status["already_done"] += 1
                continue
            rid, prepared = prepare_row(row, job, fmt, scan, media, folder=folder is not None)
            if isinstance(prepared, str):
                status["invalid"] += 1
                if len(invalid) < INVALID_SHOWN:
                    invalid.append(prepared)
                continue
            status["to_send"] += 1
            if fmt == "openai_batch":
                lines.check(prepared, row.where)
            prompt_tokens += prepared.prompt_tokens_estimate
            if first is None:
                first = {
                    "url": (job.base_url.rstrip("/") + "/chat/completions") if not job.uses_simulator else "simulator",
                    "headers": {"Authorization": "Bearer ***", "Content-Type": "application/json"},
                    "id": rid,
                    "body": with_marker_note(prepared.body, prepared.media),
                }
    est = CompletionEstimate(job.effective_max_tokens)
    return DryRunReport(
        total_rows=min(limit, scan.rows),
        already_done=status.get("already_done", 0),
        status=status,
        invalid_examples=invalid,
        first_request=first,
        prompt_tokens_estimate=prompt_tokens,
        expected_completion_tokens=est.tokens(),
        max_completion_tokens=job.effective_max_tokens,
        prices=job.price_table,
        model=job.model,
        notes=[*(folder.lines() if folder is not None else []), *(f"warning: {n}" for n in job_notices(job)), *lines.lines()],
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
    payload)`` returning a :class:`~batchkimi.http.transport.Reply`): for benchmarks of the engine alone."""
    if job.engine == "ray":
        raise ConfigError("engine = 'ray' runs through batchkimi.run() or the CLI (they start and end the Ray connection)")
    key = api_key or resolve_api_key(job)  # before the dataset is read
    return await JobRun(job, key, hook=hook, overwrite=overwrite, install_signal_handlers=install_signal_handlers,
                        stop=stop, transport=transport).execute()


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop :func:`run` makes: uvloop (libuv: less CPU per socket event and per
    stream chunk) where it is installed, unless ``choice`` is ``"asyncio"``; None means
    asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop = 'uvloop', and uvloop is not installed here (pip install uvloop; "
                              "it runs on Linux and macOS)") from None
        return None
    return uvloop.new_event_loop


def run(job: Job, **kwargs: Any) -> Summary:
    """Run a job to the end and return its :class:`Summary` (a sync door over :func:`run_async`),
    on the job's ``event_loop``. :func:`run_async` runs on whatever loop its caller has."""
    if job.engine == "ray":
        for name in ("stop", "transport"):
            if kwargs.get(name) is not None:
                raise ConfigError(f"engine = 'ray' takes no {name}=: the requests are sent by the cluster's actors")
        from .execution.ray import run_on_ray  # the core never imports Ray

        key = kwargs.pop("api_key", None) or resolve_api_key(job)
        return run_on_ray(job, api_key=key, **{k: v for k, v in kwargs.items() if k not in ("stop", "transport")})
    with asyncio.Runner(loop_factory=loop_factory(job.event_loop)) as runner:
        return runner.run(run_async(job, **kwargs))
