"""The public doors: :func:`run` (sync), :func:`run_async`, :func:`dry_run`, and
:class:`RowEngine` (one request at a time, for another scheduler).

A door resolves where the requests go (``base_url = "simulator"`` starts the built-in
simulator in this process for as long as the run needs it), picks the executor (this process,
or a Ray cluster's actors), runs the job (:class:`~batchkimi.execution.run.Run`), and then
scores the output when the job says how (:mod:`batchkimi.scoring`): scoring is a pass after the
run, never inside the request path.

Ctrl-C or SIGTERM (when ``install_signal_handlers``): send nothing new, give requests in
flight ``grace_s`` seconds, write what is done, return ``Summary.interrupted``. A second
signal skips the grace period.

Example (in a notebook, whose event loop is already running)::

    summary = await batchkimi.run_async(batchkimi.load_job("jobs/demo.toml"))
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from .config import SIMULATOR, Job, job_notices, resolve_api_key
from .config.specs import specs_of
from .errors import ConfigError
from .events import Hook, no_hook
from .execution import row as _row
from .execution.local import LocalExecutor
from .execution.plan import dry_plan
from .execution.rows import LineBudgetNotes, prepare_row
from .execution.run import Executor, Run
from .execution.summary import DryRunReport, Summary
from .input.reader import read_rows
from .input.send import with_marker_note
from .kimi import completion_range
from .policy.ratelimit import CompletionEstimate, Limiter
from .scoring.grader import grade_pending, known_grades
from .scoring.score import score_output
from .storage.location import is_url
from .storage.remote import output_copy

__all__ = ["RowEngine", "Summary", "dry_run", "run", "run_async"]
INVALID_SHOWN = 50  # rows named one by one in a dry run's report


@contextlib.asynccontextmanager
async def serving(job: Job) -> AsyncIterator[tuple[str, bytes | None]]:
    """Where the job's requests go, as (base URL, a CA certificate to trust or None); for
    ``base_url = "simulator"`` a simulator is started in this process (on a free loopback port)
    for as long as the context is open."""
    if job.base_url != SIMULATOR:
        yield job.base_url, None
        return
    # The simulator is a product of its own: imported only here, only when asked for.
    from .simulator import start_in_thread

    sim = await asyncio.to_thread(start_in_thread, dict(job.simulator))
    try:
        yield sim.base_url, sim.ca_pem
    finally:
        await asyncio.to_thread(sim.stop)


def check_simulator(job: Job) -> Any:
    """A job's ``[simulator]`` table, checked before anything starts: one line naming a bad key.
    The simulator's settings (a ``SimConfig``), or None for a job that uses no simulator."""
    if not job.uses_simulator:
        return None
    from .simulator import SimConfig

    try:
        return SimConfig.from_mapping(dict(job.simulator or {}))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the job's [simulator] table: {exc}") from None


class RowEngine(_row.RowEngine):
    """:class:`batchkimi.execution.row.RowEngine` (one request, with its retries, through a
    shared limiter), with :meth:`create`, which also serves ``base_url = "simulator"``."""

    @classmethod
    @contextlib.asynccontextmanager
    async def create(cls, job: Job, api_key: str, *, base_url: str | None = None, hook: Hook = no_hook,
                     limiter: Limiter | None = None) -> AsyncIterator[RowEngine]:  # type: ignore[override]
        """A RowEngine with its own transport (and limiter, unless one is given), for use in
        another scheduler's worker.

        Example::

            async with batchkimi.RowEngine.create(job, api_key) as engine:
                row = await engine.process("q-17", 17, batchkimi.build_request(record, job))
        """
        target = job if base_url is None else job.replace(base_url=base_url)
        async with serving(target) as (url, ca_pem), _row.endpoint(job, api_key, url, ca_pem=ca_pem) as transport:
            yield cls(job, transport, limiter or _row.limiter_of(job), _row.policy_of(job), hook=hook)


def dry_run(job: Job) -> DryRunReport:
    """Check every row (its images and videos included), count each status, render the first
    request; send nothing (and so need no API key), write nothing."""
    sim = check_simulator(job)
    status: Counter[str] = Counter()
    invalid: list[str] = []
    first: dict[str, Any] | None = None
    prompt_tokens = 0
    with dry_plan(job) as plan:
        lines = LineBudgetNotes(job)
        folder = plan.folder is not None
        k = job.samples
        for batch in read_rows(plan.path, plan.fmt):
            for row in batch:
                if row.pos * k >= plan.limit:
                    break
                pending = [s for s in range(k) if not (row.pos * k + s < len(plan.done) and plan.done[row.pos * k + s])]
                if len(pending) < k:
                    status["already_done"] += k - len(pending)
                if not pending:
                    continue
                rid, prepared = prepare_row(row, job, plan.fmt, plan.scan, plan.media, folder=folder)
                if isinstance(prepared, str):
                    status["invalid"] += len(pending)
                    if len(invalid) < INVALID_SHOWN:
                        invalid.append(prepared)
                    continue
                status["to_send"] += len(pending)
                if plan.fmt == "openai_batch":
                    lines.check(prepared, row.where)
                prompt_tokens += prepared.prompt_tokens_estimate * len(pending)
                if first is None:
                    first = {
                        "url": (job.base_url.rstrip("/") + "/chat/completions") if not job.uses_simulator else "simulator",
                        "headers": {"Authorization": "Bearer ***", "Content-Type": "application/json"},
                        "id": rid,
                        "body": with_marker_note(prepared.body, prepared.media),
                    }
        sent = status.get("to_send", 0)
        # the range assumes Kimi's shape: the simulator's own when it answers, none for its short shape
        ranged = sim is None or sim.shape == "kimi"
        shape = sim.length_shape(job.served_model, job.thinking_on) if sim is not None and ranged else None
        rng_tokens = completion_range(sent, job.effective_max_tokens, job.thinking_on, shape) if ranged and sent else None
        notes = [*(plan.folder.lines() if plan.folder is not None else []),
                 *(f"warning: {n}" for n in job_notices(job)), *lines.lines()]
        return DryRunReport(
            total_rows=plan.limit,
            already_done=status.get("already_done", 0),
            status=status,
            invalid_examples=invalid,
            first_request=first,
            prompt_tokens_estimate=prompt_tokens,
            expected_completion_tokens=CompletionEstimate(job.effective_max_tokens).tokens(),
            max_completion_tokens=job.effective_max_tokens,
            prices=job.price_table,
            model=job.model,
            notes=notes,
            completion_range=rng_tokens,
        )


async def _score(job: Job, summary: Summary, api_key: str, base_url: str, ca_pem: bytes | None) -> None:
    """Score the whole output when the job says how; a model grader grades what has no grade yet."""
    specs = specs_of(job.extract, job.score, job.tools)
    if specs.empty:
        return
    remote = output_copy(summary.output, dict(job.storage))
    out = remote.local if remote is not None else Path(summary.output)
    try:
        grades = None
        if specs.score is not None and specs.score.method == "model" and not (
                summary.fatal or summary.interrupted or summary.budget_stop or summary.wait_until is not None):
            executor = LocalExecutor(api_key, base_url=base_url, ca_pem=ca_pem)
            graded = await grade_pending(out, job, specs, executor)
            summary.notes.append(f"model grader: {graded['graded_now']} answers graded now, {graded['answers']} in all")
            grades = await asyncio.to_thread(known_grades, out)
        summary.scores = await asyncio.to_thread(score_output, out, specs, grades)
        if remote is not None:
            await asyncio.to_thread(remote.push)
    except Exception as exc:  # noqa: BLE001 - the results stand; their scores can be made again
        summary.notes.append(f"scoring failed ({type(exc).__name__}: {exc}); run `batchkimi score {out}` to try again")


async def grade(output: Path, job: Job, api_key: str) -> dict[str, int]:
    """Grade, with the job's model grader, the answers of ``output`` that have no grade yet."""
    specs = specs_of(job.extract, job.score, job.tools)
    async with serving(job) as (url, ca_pem):
        return await grade_pending(output, job, specs, LocalExecutor(api_key, base_url=url, ca_pem=ca_pem))


async def _run(job: Job, key: str, make: Callable[[str, bytes | None], Executor], **kwargs: Any) -> Summary:
    async with serving(job) as (url, ca_pem):
        summary = await Run(job, make(url, ca_pem), **kwargs).execute()
        await _score(job, summary, key, url, ca_pem)
    return summary


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
    """Run a whole job on the caller's event loop, then score it; see the module docstring.
    Raises a :class:`~batchkimi.errors.JobError` for a job-level problem (after writing what
    is done); failed rows are rows, not exceptions. Cancelling it ends every task it started.

    ``transport`` replaces the HTTP transport (anything with ``async complete(body, *, stream,
    payload)`` returning a :class:`~batchkimi.http.transport.Reply`): for benchmarks of the engine alone."""
    if job.engine == "ray":
        raise ConfigError("engine = 'ray' runs through batchkimi.run() or the CLI (they start and end the Ray connection)")
    check_simulator(job)
    key = api_key or resolve_api_key(job)  # before the dataset is read
    return await _run(job, key, lambda url, pem: LocalExecutor(key, base_url=url, ca_pem=pem, transport=transport),
                      hook=hook, overwrite=overwrite, install_signal_handlers=install_signal_handlers, stop=stop)


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


def _in_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run(job: Job, **kwargs: Any) -> Summary:
    """Run a job to the end and return its :class:`Summary` (a sync door over :func:`run_async`),
    on the job's ``event_loop``. Inside a running event loop (a notebook), use
    ``await batchkimi.run_async(job)`` instead, or call this from a thread."""
    if _in_a_loop():
        raise ConfigError("batchkimi.run() was called inside a running event loop (a notebook?): "
                          "use `await batchkimi.run_async(job)` there, or call run() from a thread")
    if job.engine != "ray":
        with asyncio.Runner(loop_factory=loop_factory(job.event_loop)) as runner:
            return runner.run(run_async(job, **kwargs))
    for name in ("stop", "transport"):
        if kwargs.get(name) is not None:
            raise ConfigError(f"engine = 'ray' takes no {name}=: the requests are sent by the cluster's actors")
        kwargs.pop(name, None)
    from .execution.ray import RayExecutor, ray_session  # the core never imports Ray

    check_simulator(job)
    key = kwargs.pop("api_key", None) or resolve_api_key(job)
    # Ray's workers do not run in this directory: every path they see is absolute.
    job = job.replace(**{k: str(Path(v).expanduser().resolve()) for k in ("input", "output", "media_root", "ca_file")
                         if (v := getattr(job, k)) and not is_url(v)})
    with ray_session(job), asyncio.Runner(loop_factory=loop_factory(job.event_loop)) as runner:
        return runner.run(_run(job, key, lambda url, pem: RayExecutor(key, base_url=url, ca_pem=pem), **kwargs))
