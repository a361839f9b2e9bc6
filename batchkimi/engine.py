"""The engine: rows in, result rows out, through one rate limiter.

Two layers, one code path:

- :class:`RowEngine` sends *one* prepared request with its retries through the shared
  limiter and returns its result row. It is all another scheduler needs: a Ray actor (or
  any worker) builds one with :meth:`RowEngine.create` and awaits :meth:`RowEngine.process`.
- :func:`run_async` is the whole job: scan the input, open the output (resuming), feed rows
  through a bounded queue to ``concurrency`` workers, and hand every result to the one
  writer task. :func:`run` is its synchronous door, for the CLI and for notebooks.

Ctrl-C or SIGTERM (when ``install_signal_handlers``): stop taking rows, give requests in
flight ``grace_s`` seconds, write what is done, return ``Summary.interrupted``. A second
signal skips the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from . import __version__
from .client import Timeouts, Transport
from .config import Job, resolve_api_key
from .errors import APIError, ConfigError, FatalAPIError, OutputError
from .events import (
    AttemptFinished,
    AttemptStarted,
    Hook,
    RowFinished,
    RunStarted,
    Stopping,
    no_hook,
)
from .ratelimit import Clock, CompletionEstimate, MonotonicClock, RateLimiter
from .reader import InputScan, SourceRow, detect_format, read_rows, row_id, scan_input
from .request import Prepared, RowInvalid, build_request
from .retry import RetryPolicy
from .sink import MANIFEST, Sink, kept_column_name
from .summary import DryRunReport, Summary, cost_usd


def _now_ms() -> int:
    return int(time.time() * 1000)


def invalid_row(rid: str | None, pos: int, message: str) -> dict[str, Any]:
    return {
        "id": rid if rid is not None else f"row-{pos}",
        "row": pos,
        "status": "invalid",
        "attempts": 0,
        "error_type": "invalid_row",
        "error_message": message,
        "finished_at": _now_ms(),
    }


class RowEngine:
    """Sends one request, with retries, through a shared :class:`RateLimiter`.

    Example (inside any asyncio worker, a Ray actor included)::

        async with RowEngine.create(job, api_key) as engine:
            row = await engine.process("q-17", 17, build_request(record, job))
    """

    def __init__(
        self,
        job: Job,
        transport: Any,
        limiter: RateLimiter,
        policy: RetryPolicy,
        *,
        hook: Hook = no_hook,
        clock: Clock | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        self.job = job
        self.transport = transport
        self.limiter = limiter
        self.policy = policy
        self.hook = hook
        self.clock = clock or MonotonicClock()
        self.rng = rng or random.random
        self.requests = 0
        self.retries = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def create(cls, job: Job, api_key: str, *, base_url: str | None = None, hook: Hook = no_hook) -> AsyncIterator[RowEngine]:
        """A RowEngine with its own transport and limiter, for use in another scheduler's worker."""
        async with Transport(base_url or job.base_url, api_key, timeouts_of(job)) as transport:
            yield cls(job, transport, limiter_of(job), policy_of(job), hook=hook)

    async def process(self, rid: str, pos: int, prepared: Prepared) -> dict[str, Any]:
        """The result row for one request. Raises :class:`FatalAPIError` when the API refuses the
        job itself (auth, quota, wrong model or URL): every other request would fail alike."""
        attempts = 0
        first_start = self.clock.now()
        streaming = bool(prepared.body.get("stream"))
        while True:
            permit = await self.limiter.acquire(prepared.prompt_tokens_estimate)
            attempts += 1
            self.requests += 1
            self.hook(AttemptStarted(attempts))
            t0 = self.clock.now()
            try:
                reply = await self.transport.complete(prepared.body, stream=streaming)
            except APIError as exc:
                self.limiter.release(permit, 0 if exc.http_status == 429 else prepared.prompt_tokens_estimate)
                if exc.fatal:
                    self.hook(AttemptFinished(False, exc.http_status, exc.error_type, 0))
                    raise FatalAPIError(f"every request would fail like this one: {exc}", cause=exc) from exc
                elapsed = self.clock.now() - first_start
                if exc.http_status == 429 and exc.retryable:
                    pause = self.policy.server_delay_s(exc)
                    self.limiter.cool_down(pause if pause is not None else self.policy.backoff_s(attempts, self.rng))
                delay = self.policy.next_delay_s(exc, attempts, elapsed, self.rng)
                self.hook(AttemptFinished(False, exc.http_status, exc.error_type, 0, delay))
                if delay is None:
                    return self._error_row(rid, pos, exc, attempts, self.clock.now() - t0)
                self.retries += 1
                if exc.http_status != 429:  # a 429's wait is the shared cool-down, taken in acquire()
                    await self.clock.sleep(delay)
                continue
            latency = self.clock.now() - t0
            answer = reply.answer
            usage = answer.usage
            self.limiter.release(permit, usage.total_tokens, usage.completion_tokens)
            if reply.ratelimit_reset_s:
                self.limiter.pause(reply.ratelimit_reset_s)
            status, error_type, message = "ok", None, None
            if answer.finish_reason == "length":
                status = "truncated"
                if not answer.content and not answer.tool_calls:
                    error_type = "reasoning_exhausted_budget"
                    message = (
                        f"finish_reason=length with an empty answer: the reasoning used the whole "
                        f"max_tokens budget ({prepared.body.get('max_tokens', 'default')}); raise max_tokens"
                    )
                else:
                    error_type = "max_tokens_reached"
                    message = "finish_reason=length: the answer was cut at max_tokens"
            elif answer.finish_reason == "content_filter":
                status, error_type, message = "error", "content_filter", "the answer was withheld by the content filter"
            self.hook(AttemptFinished(True, reply.http_status, None, usage.total_tokens or 0))
            model = answer.model or self.job.model
            return {
                "id": rid,
                "row": pos,
                "status": status,
                "content": answer.content,
                "reasoning_content": answer.reasoning_content,
                "tool_calls": orjson.dumps(answer.tool_calls).decode() if answer.tool_calls else None,
                "finish_reason": answer.finish_reason,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
                "cached_tokens": usage.cached_tokens,
                "cost_usd": cost_usd(self.job.prices, model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
                "model": model,
                "attempts": attempts,
                "latency_s": round(latency, 4),
                "ttft_s": None if answer.ttft_s is None else round(answer.ttft_s, 4),
                "http_status": reply.http_status,
                "error_type": error_type,
                "error_message": message,
                "request_id": reply.request_id,
                "finished_at": _now_ms(),
            }

    def _error_row(self, rid: str, pos: int, exc: APIError, attempts: int, latency: float) -> dict[str, Any]:
        return {
            "id": rid,
            "row": pos,
            "status": "error",
            "model": self.job.model,
            "attempts": attempts,
            "latency_s": round(latency, 4),
            "http_status": exc.http_status,
            "error_type": exc.error_type,
            "error_message": exc.message[:2000],
            "request_id": exc.request_id,
            "finished_at": _now_ms(),
        }


def timeouts_of(job: Job) -> Timeouts:
    return Timeouts(job.connect_timeout_s, job.first_byte_timeout_s, job.idle_timeout_s, job.attempt_timeout_s)


def limiter_of(job: Job) -> RateLimiter:
    return RateLimiter(concurrency=job.concurrency, rpm=job.rpm, tpm=job.tpm,
                       completion=CompletionEstimate(job.effective_max_tokens))


def policy_of(job: Job) -> RetryPolicy:
    return RetryPolicy(job.max_attempts, job.max_retry_time_s, job.backoff_base_s, job.backoff_max_s, job.max_retry_after_s)


# ---- the whole job ----------------------------------------------------------------------


def _kept(row: SourceRow, job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {}
    data = row.data or {}
    for column in job.keep_columns:
        value = data.get(column)
        if value is not None and not isinstance(value, str):
            value = orjson.dumps(value, default=str).decode()
        out[kept_column_name(column)] = value
    return out


def _prepare(row: SourceRow, job: Job, fmt: str, has_id: bool) -> tuple[str | None, Prepared | str]:
    """(id, request) or (id, error message naming the place to fix)."""
    if row.error is not None or row.data is None:
        return None, row.error or f"{row.where} is empty"
    rid = row_id(row, fmt, job.id_column, has_id)
    if rid is None:
        column = "custom_id" if fmt == "openai_batch" else job.id_column
        return None, f"{row.where}: column '{column}' is missing or empty"
    try:
        return rid, build_request(row.data, job, batch_line=fmt == "openai_batch")
    except RowInvalid as exc:
        return rid, f"{row.where}: {exc}"


def _open_input(job: Job, sink: Sink | None) -> tuple[Path, str, InputScan, dict[str, Any] | None]:
    if not job.input:
        raise ConfigError("no input: set 'input' in the job file or pass --input")
    path = Path(job.input)
    fmt = detect_format(path, job.input_format)
    manifest = sink.read_manifest() if sink is not None and sink.dir.exists() else None
    scan: InputScan | None = None
    if manifest:
        old = manifest.get("input", {})
        try:
            st = path.stat()
            if old.get("size_bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and path.is_file():
                scan = InputScan(old["rows"], old["fingerprint"], old["has_id_column"], st.st_size, st.st_mtime_ns)
        except (OSError, KeyError):
            scan = None
    if scan is None:
        scan = scan_input(path, fmt, job.id_column)
        if job.id_column != "id" and not scan.has_id_column and fmt != "openai_batch":
            raise ConfigError(f"id_column '{job.id_column}' is not a column of {path}")
    return path, fmt, scan, manifest


def _refuse_foreign_output(out: Path) -> None:
    """Never write into, or delete, a non-empty directory that batchkimi did not make."""
    if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise OutputError(
            f"{out} is not empty and holds no {MANIFEST}: it is not a batchkimi output. "
            "Choose another --output; batchkimi will not write into or delete it."
        )


def _check_resume(manifest: dict[str, Any] | None, job: Job, scan: InputScan, out: Path) -> None:
    if not manifest:
        return
    fresh = f"Use a new --output, or pass --overwrite to delete {out} and start fresh."
    if manifest.get("input", {}).get("fingerprint") != scan.fingerprint:
        raise OutputError(f"the input changed since {out} was written (its fingerprint differs). {fresh}")
    old = manifest.get("request_settings", {})
    new = orjson.loads(orjson.dumps(job.request_settings()))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise OutputError(f"{out} was made by a job that sends different requests ({diff}). {fresh}")


def dry_run(job: Job, *, check_key: bool = True) -> DryRunReport:
    """Check every row, count each status, render the first request; send nothing."""
    if check_key:
        resolve_api_key(job)
    sink = Sink(Path(job.output), job.keep_columns) if job.output else None
    path, fmt, scan, manifest = _open_input(job, sink)
    if sink is not None and manifest:
        _check_resume(manifest, job, scan, sink.dir)
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
            rid, prepared = _prepare(row, job, fmt, scan.has_id_column)
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
    for a job-level problem; failed rows are rows, not exceptions.

    ``transport`` replaces the HTTP transport (anything with ``async complete(body, stream=)``
    returning a :class:`~batchkimi.client.Reply`): for benchmarks of the engine alone."""
    key = api_key or resolve_api_key(job)  # before the dataset is read
    if not job.output:
        raise ConfigError("no output: set 'output' in the job file or pass --output")
    out = Path(job.output)
    _refuse_foreign_output(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    sink = Sink(out, job.keep_columns, job.rows_per_part)
    started = time.monotonic()
    path, fmt, scan, manifest = _open_input(job, sink)
    _check_resume(manifest, job, scan, out)
    sink.prepare()
    try:
        return await _run_locked(job, sink, path, fmt, scan, manifest, key, started, hook, install_signal_handlers, stop, transport)
    finally:
        sink.unlock()


async def _run_locked(
    job: Job, sink: Sink, path: Path, fmt: str, scan: InputScan, manifest: dict[str, Any] | None, key: str,
    started: float, hook: Hook, install_signal_handlers: bool, stop: asyncio.Event | None, transport: Any,
) -> Summary:
    out = sink.dir
    state = sink.compact(scan.rows)
    done = state.done
    if not job.retry_errors:
        done[sink.positions_with_status(["error", "truncated"])] = True
    limit = min(scan.rows, job.limit) if job.limit is not None else scan.rows
    already = int(done[:limit].sum())
    summary = Summary(str(out), limit, already)
    manifest = _manifest(job, path, fmt, scan, manifest, "running")
    sink.write_manifest(manifest)
    hook(RunStarted(limit, already, limit - already))

    stop = stop or asyncio.Event()
    fatal: list[FatalAPIError] = []
    loop = asyncio.get_running_loop()
    signals_seen = [0]

    workers: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        signals_seen[0] += 1
        summary.interrupted = True
        stop.set()
        if signals_seen[0] == 1:
            hook(Stopping(f"interrupted: finishing requests in flight for up to {job.grace_s:g}s (again to stop now)"))
        else:
            for w in workers:  # a second signal: no grace
                w.cancel()

    installed = []
    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)

    sim = None
    base_url = job.base_url
    if job.uses_simulator and transport is None:
        from .simulator import start_in_thread

        sim = start_in_thread(dict(job.simulator), api_keys=None)
        base_url = sim.base_url

    # Bounded: when the writer is busy turning a segment into a part, workers wait (flat memory).
    results: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=max(2 * job.concurrency, 1024))
    work: asyncio.Queue[tuple[int, str, Prepared, dict[str, Any]] | None] = asyncio.Queue(maxsize=max(2 * job.concurrency, 64))
    n_workers = max(1, min(job.concurrency, limit - already))

    async def finish(row: dict[str, Any]) -> None:
        status = row["status"]
        summary.run_status[status] += 1
        summary.prompt_tokens += row.get("prompt_tokens") or 0
        summary.completion_tokens += row.get("completion_tokens") or 0
        summary.cached_tokens += row.get("cached_tokens") or 0
        summary.cost_usd += row.get("cost_usd") or 0.0
        if status != "ok":
            message = row.get("error_message") or ""
            summary.errors[f"{row.get('error_type')}: {message[:160]}{'...' if len(message) > 160 else ''}"] += 1
        hook(RowFinished(status, row.get("total_tokens") or 0, row.get("attempts") or 0))
        await results.put(row)

    async def feed_rows() -> None:
        skip = state.first_pending() if len(done) else 0
        for batch in read_rows(path, fmt, skip_until=min(skip, limit)):
            for row in batch:
                if row.pos >= limit or stop.is_set():
                    return
                if row.pos < len(done) and done[row.pos]:
                    continue
                rid, prepared = _prepare(row, job, fmt, scan.has_id_column)
                if isinstance(prepared, str):
                    inv = invalid_row(rid, row.pos, prepared)
                    inv.update(_kept(row, job))
                    await finish(inv)
                    continue
                assert rid is not None  # _prepare returns an id with every request
                await work.put((row.pos, rid, prepared, _kept(row, job)))
                summary.sent_rows += 1
            await asyncio.sleep(0)

    async def feed() -> None:
        await feed_rows()
        # Only after a normal end: a cancelled feeder must not wait on a queue nobody reads.
        for _ in range(n_workers):
            await work.put(None)

    async def worker(engine: RowEngine) -> None:
        while True:
            item = await work.get()
            if item is None or stop.is_set():
                return
            pos, rid, prepared, kept = item
            try:
                row = await engine.process(rid, pos, prepared)
            except FatalAPIError as exc:
                if not fatal:
                    fatal.append(exc)
                    hook(Stopping(str(exc)))
                stop.set()
                return
            row.update(kept)
            await finish(row)

    async def write() -> None:
        last_roll = last_sync = time.monotonic()
        while True:
            item = await results.get()
            batch = [item]
            while not results.empty():
                batch.append(results.get_nowait())
            end = batch[-1] is None
            rows = [r for r in batch if r is not None]
            full = sink.append(rows)
            now = time.monotonic()
            if full or (rows and now - last_roll >= job.flush_interval_s):
                await asyncio.to_thread(sink.roll)
                last_roll = last_sync = now
            elif now - last_sync >= 1.0:
                await asyncio.to_thread(sink.sync)
                last_sync = now
            if end:
                return

    writer = asyncio.create_task(write())
    write_error: BaseException | None = None
    try:
        opened = contextlib.nullcontext(transport) if transport is not None else Transport(base_url, key, timeouts_of(job))
        async with opened as transport:
            limiter = limiter_of(job)
            engine = RowEngine(job, transport, limiter, policy_of(job), hook=hook)
            feeder = asyncio.create_task(feed())
            workers.extend(asyncio.create_task(worker(engine)) for _ in range(n_workers))
            stopper = asyncio.create_task(stop.wait())
            pending = {feeder, writer, *workers}
            # run until every worker ends, the writer fails, or a stop is asked for
            while any(not w.done() for w in workers):
                finished, _ = await asyncio.wait({*workers, writer, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if writer in finished:
                    write_error = writer.exception() or OutputError("the writer stopped early")
                    stop.set()
                    break
                if stopper in finished:
                    break
            if stop.is_set():
                feeder.cancel()
                live = [w for w in workers if not w.done()]
                grace = 0 if write_error or signals_seen[0] > 1 else job.grace_s
                if live and grace:
                    await asyncio.wait(live, timeout=grace)
                for w in workers:
                    w.cancel()
            stopper.cancel()
            await asyncio.gather(*pending - {writer}, return_exceptions=True)
            summary.requests, summary.retries = engine.requests, engine.retries
            summary.rate_limited = limiter.rate_limited
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if not writer.done():
            await results.put(None)
            with contextlib.suppress(Exception):
                await writer
        if write_error is None and writer.done() and not writer.cancelled() and writer.exception():
            write_error = writer.exception()
        if sim is not None:
            sim.stop()
    if write_error is not None:
        raise write_error
    await asyncio.to_thread(sink.close)
    below = limit if job.limit is not None else None
    if summary.run_status and len(sink.latest[0]):
        # Rows written before this run may now be superseded: rewrite those parts.
        sink.compact(scan.rows)
        summary.final_status = sink.status_counts(below=below)
    else:
        # Nothing older to supersede (a fresh run, or one that sent nothing): no need to re-read.
        final = Counter(sink.status_counts(below=below))
        final.update(summary.run_status)
        summary.final_status = dict(final)
    summary.wall_s = time.monotonic() - started
    if fatal:
        summary.fatal = str(fatal[0])
    manifest = _manifest(job, path, fmt, scan, manifest, "interrupted" if summary.interrupted else "finished", summary)
    sink.write_manifest(manifest)
    return summary


def _manifest(
    job: Job, path: Path, fmt: str, scan: InputScan, old: dict[str, Any] | None, state: str, summary: Summary | None = None
) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    runs = list((old or {}).get("runs", []))
    if summary is None:
        runs.append({"started": now, "batchkimi_version": __version__})
    elif runs:
        runs[-1].update({"finished": now, "state": state, **summary.as_dict()})
    return {
        "batchkimi_version": __version__,
        "state": state,
        "job": job.public_dict(),
        "request_settings": job.request_settings(),
        "input": {
            "path": str(path),
            "format": fmt,
            "fingerprint": scan.fingerprint,
            "rows": scan.rows,
            "has_id_column": scan.has_id_column,
            "size_bytes": scan.size_bytes,
            "mtime_ns": scan.mtime_ns,
        },
        "counts": summary.final_status if summary else (old or {}).get("counts", {}),
        "created": (old or {}).get("created", now),
        "updated": now,
        "runs": runs[-50:],
    }


def run(job: Job, **kwargs: Any) -> Summary:
    """Run a job to the end and return its :class:`Summary` (a sync door over :func:`run_async`)."""
    return asyncio.run(run_async(job, **kwargs))
