"""The same job on a Ray cluster (``engine = "ray"``): same rows, same output, same guarantees.

The driver (this process) does what a local run does around the requests: it reads the output
directory to know which rows are done, writes the manifest, journals every result as it comes
back, compacts, scores and summarises (it *is* a :class:`~batchkimi.execution.run.JobRun`). What it
hands to Ray is the middle: it cuts the input into blocks of ``ray_block_rows`` rows (byte
offsets of a JSONL file, row ranges of a Parquet row group; the rows themselves are not read
here), and a Ray Dataset of those blocks, one Ray block each, goes through ``map_batches`` on a
pool of actors. Each actor (:class:`BlockWorker`) reads its block's rows from the shared input,
checks and prepares them (media files included) with :func:`~batchkimi.execution.run.prepare_row`,
and sends them with batchkimi's own :class:`~batchkimi.execution.row.RowEngine` (client, SSE,
retries, error rows): one code path for a request, local or on a cluster. The block is the
unit of commit: its result rows come back together and are journaled at once.

One limit for the cluster: a named actor per (endpoint, key) (:mod:`batchkimi.execution.ray_limiter`).

Stopping (a signal, a fatal error, the budget): the driver tells every worker through a small
per-run actor; workers start no new attempt (rows not sent stay pending), requests in flight get
``grace_s``, and what came back is written. Resume after any crash sends again only the rows of
blocks that were in flight and not yet written.

Ray is imported here only; ``import batchkimi`` never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from ..config import Job
from ..errors import ConfigError, FatalAPIError, JobError
from ..events import Hook, no_hook
from ..http.transport import Transport
from ..input.reader import _iter_jsonl, jsonl_blocks, parquet_block_rows, parquet_blocks
from ..output.results import invalid_row
from ..policy.breaker import FailureBreaker
from ..policy.budget import Reservation
from .ray_limiter import LeasedLimiter, limit_actor, limit_name
from .row import AccountWaiting, RowAbandoned, RowEngine, policy_of, timeouts_of
from .run import _END, JobRun, _tokens_of, kept_values, prepare_row
from .summary import Summary, resume_time

log = logging.getLogger("batchkimi.ray")

STATS = b"__batchkimi_stats__"  # the marker of a block's last record: the worker's counters
_POLL_S = 0.5  # how often a worker asks whether the run is stopping


def require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("engine = 'ray' needs Ray, which is not installed here: pip install 'batchkimi[ray]' "
                          "(or run without --engine ray)") from None
    return ray


class RunControl:
    """The body of a per-run actor: whether the driver has asked every worker to stop."""

    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def is_stopped(self) -> bool:
        return self.stopped


# ---- the workers ---------------------------------------------------------------------------
class BlockWorker:
    """A Ray Data actor: one block of input rows in, their result rows out (as JSON bytes, and a
    last record with this worker's counters since its previous block)."""

    def __init__(self, *, job: Job, key: str, url: str, ca_pem: bytes | None, fmt: str, scan: Any, media: Any,
                 folder: bool, limit: Any, control: Any, workers: int) -> None:
        self.job, self.key, self.url, self.ca_pem = job, key, url, ca_pem
        self.fmt, self.scan, self.media, self.folder = fmt, scan, media, folder
        self.limit, self.control, self.workers = limit, control, workers
        self.engine: RowEngine | None = None
        self.reported = (0, 0, 0)
        self.watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never show the key
        return f"BlockWorker({self.url!r})"

    async def _engine(self) -> RowEngine:
        if self.engine is None:
            job = self.job
            transport = Transport(self.url, self.key, timeouts_of(job), ca_file=job.ca_file, ca_pem=self.ca_pem)
            await transport.__aenter__()  # for the actor's life: its connections are reused block after block
            limiter = LeasedLimiter(self.limit, rpm=job.rpm, tpm=job.tpm, concurrency=job.concurrency,
                                    workers=self.workers, max_tokens=job.effective_max_tokens)
            self.engine = RowEngine(job, transport, limiter, policy_of(job), breaker=FailureBreaker(job.stop_after_failures))
            # One watcher an actor (not a block: a hundred actors of many blocks would flood the
            # control actor), for the actor's life; it ends when the run stops or the driver is gone.
            self.watcher = asyncio.get_running_loop().create_task(self._watch(self.engine), name="batchkimi-ray-watch")
            self.watcher.add_done_callback(_report_failure)
        return self.engine

    def _read(self, desc: dict[str, Any]) -> list[tuple[Any, str, Any, dict[str, Any]]]:
        """The block's rows not yet done, prepared (in a thread: it reads files)."""
        if desc["kind"] == "parquet":
            rows = parquet_block_rows(desc["file"], desc["first_in_file"], desc["start"], desc["stop"])
        else:
            rows = _iter_jsonl(Path(desc["path"]), stop_after=desc["stop"], start=(desc["offset"], desc["lines"], desc["start"]))
        skip = set(desc["skip"])
        out = []
        for row in rows:
            if row.pos in skip:
                continue
            rid, prepared = prepare_row(row, self.job, self.fmt, self.scan, self.media, folder=self.folder)
            out.append((row, rid, prepared, kept_values(row, self.job)))
        return out

    async def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        desc = orjson.loads(batch.column("desc")[0].as_py())
        engine = await self._engine()
        # A stopped run: Ray Data still hands out the blocks left; they are not even read.
        rows = [] if engine.stopping else await asyncio.to_thread(self._read, desc)
        done: list[bytes] = []
        trouble: dict[str, str] = {}

        async def one(row: Any, rid: str, prepared: Any, kept: dict[str, Any]) -> None:
            if isinstance(prepared, str):
                result = invalid_row(rid, row.pos, prepared)
            else:
                try:
                    result = await engine.process(rid, row.pos, prepared)
                except RowAbandoned:
                    return
                except FatalAPIError as exc:
                    trouble.setdefault("fatal", str(exc))
                    engine.stop()
                    return
                except AccountWaiting as exc:  # the row stays pending; the driver stops the run
                    trouble.setdefault("wait", orjson.dumps([exc.until_epoch_s, exc.message]).decode())
                    engine.stop()
                    return
                except Exception as exc:  # noqa: BLE001 - the row's request path failed: the job stops, as locally
                    trouble.setdefault("error", f"unexpected error on {row.where} (id {rid}): {type(exc).__name__}: {exc}")
                    engine.stop()
                    return
            result.update(kept)
            done.append(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))

        async with asyncio.TaskGroup() as group:
            for item in rows:
                group.create_task(one(*item))
        limiter = engine.limiter
        if isinstance(limiter, LeasedLimiter) and limiter.in_flight == 0:
            await limiter.settle()
        now = (engine.requests, engine.retries, getattr(limiter, "rate_limited", 0))
        stats = {"requests": now[0] - self.reported[0], "retries": now[1] - self.reported[1],
                 "rate_limited": now[2] - self.reported[2], "block": desc["block"], **trouble,
                 "fallback": getattr(limiter, "fallback", None) is not None}
        self.reported = now
        done.append(STATS + orjson.dumps(stats))
        return pa.table({"row": pa.array(done, type=pa.large_binary())})

    async def _watch(self, engine: RowEngine) -> None:
        """Ask the run's control actor every ``_POLL_S`` whether to stop; stop the engine if so."""
        while not engine.stopping:
            await asyncio.sleep(_POLL_S)
            try:
                if await self.control.is_stopped.remote():
                    engine.stop()
            except Exception:  # noqa: BLE001 - the driver is gone: Ray ends this actor with it
                log.warning("batchkimi: the run's control actor cannot be reached", exc_info=True)
                return


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class _QuietProgressNote(logging.Filter):
    """Ray Data says at every run that its progress bars are off: batchkimi's bar is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("batchkimi: the stop watcher failed; this actor will not hear of a stop", exc_info=task.exception())


# ---- the driver ------------------------------------------------------------------------------
class RayJobRun(JobRun):
    """A :class:`JobRun` whose requests are sent by Ray actors (see the module docstring)."""

    def __init__(self, job: Job, api_key: str, **kwargs: Any) -> None:
        super().__init__(job, api_key, **kwargs)
        self.control: Any = None
        self._stop_time = 0.0

    def stop(self, reason: str, *, error: BaseException | None = None, fatal: str | None = None) -> None:
        first = not self.stopping
        super().stop(reason, error=error, fatal=fatal)
        if first:
            self._stop_time = time.monotonic()
            if self.control is not None:
                with contextlib.suppress(Exception):
                    self.control.stop.remote()

    def _plan(self) -> list[dict[str, Any]]:
        """Blocks holding at least one pending row below the limit; each names its done rows."""
        job, done, limit = self.job, self.done, self.limit
        blocks: list[dict[str, Any]] = []
        n = job.ray_block_rows
        if self.fmt == "parquet":
            cuts = ({"kind": "parquet", "file": str(Path(f).resolve()), "first_in_file": first, "start": a, "stop": b}
                    for f, first, a, b in parquet_blocks(self.path, n, limit))
        else:
            cuts = ({"kind": "jsonl", "path": str(Path(self.path).resolve()), "offset": off, "lines": lines, "start": a, "stop": b}
                    for off, lines, a, b in jsonl_blocks(self.path, n, limit))
        for desc in cuts:
            a, b = desc["start"], desc["stop"]
            flags = done[a:b]
            if flags.all():
                continue
            desc["skip"] = (a + flags.nonzero()[0]).tolist() if flags.any() else []
            desc["block"] = len(blocks)
            blocks.append(desc)
        return blocks

    async def _produce(self, n_workers: int) -> None:
        try:
            await self._on_ray()
        except Exception as exc:  # noqa: BLE001 - Ray failed: stop, write what came back, then raise it
            if self.error is None:
                self.error = exc if isinstance(exc, JobError) else JobError(f"the Ray run failed: {type(exc).__name__}: {exc}")
        finally:
            self._closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.results.put_nowait(_END)

    async def _on_ray(self) -> None:
        import ray

        job, loop = self.job, asyncio.get_running_loop()
        blocks = await asyncio.to_thread(self._plan)
        if not blocks or self.stopping:
            return
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = max(1, min(job.ray_actors or max(1, cpus - 1), len(blocks)))
        # Leave a CPU for Ray Data's own tasks: with every CPU taken by actors a run can hang.
        per_actor = min(1.0, max(0.05, (cpus - 1) / actors)) if cpus > 1 else 0.5
        # Blocks an actor works on at once: enough rows for its share of the concurrency, and one
        # more block to start while the last rows of the others finish.
        blocks_at_once = min(64, max(2, math.ceil(math.ceil(job.concurrency / actors) / job.ray_block_rows) + 1))
        assert self.engine is not None
        transport = self.engine.transport
        base_url = transport.url.removesuffix("/chat/completions")
        limit = await asyncio.to_thread(limit_actor, base_url, self.key, job.rpm, job.tpm, job.concurrency)
        self.control = ray.remote(RunControl).options(num_cpus=0).remote()
        if self.stopping:
            self.control.stop.remote()
        ds = ray.data.from_items([{"desc": orjson.dumps(d).decode()} for d in blocks], override_num_blocks=len(blocks))
        pool: dict[str, Any] = {"size": actors, "max_tasks_in_flight_per_actor": blocks_at_once}
        calls: dict[str, Any] = {}
        if "max_concurrent_calls_per_actor" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
            pool["max_concurrent_calls_per_actor"] = blocks_at_once  # Ray 2.5x on
        else:
            calls["max_concurrency"] = blocks_at_once  # older Rays: the actor's own option
        out = ds.map_batches(
            BlockWorker, batch_size=1, batch_format="pyarrow", num_cpus=per_actor, **calls,
            compute=ray.data.ActorPoolStrategy(**pool),
            fn_constructor_kwargs={"job": job, "key": self.key, "url": base_url,
                                   "ca_pem": transport.ca_pem, "fmt": self.fmt, "scan": self.scan,
                                   "media": self.media, "folder": self.folder is not None, "limit": limit,
                                   "control": self.control, "workers": actors})
        self.summary.notes.append(f"ray: {_n(len(blocks), 'block')} of up to {job.ray_block_rows} rows on {_n(actors, 'actor')} "
                                  f"({per_actor:g} CPU and up to {blocks_at_once} blocks at once each; "
                                  f"cluster limit actor {limit_name(base_url, self.key)})")
        finished = threading.Event()
        failure: list[BaseException] = []

        def consume() -> None:
            try:
                for batch in out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                    if finished.is_set():  # the grace is over and the writer may be gone: sent again on resume
                        return
                    rows = batch.column("row").to_pylist()
                    asyncio.run_coroutine_threadsafe(self._take(rows), loop).result()
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop's side
                failure.append(exc)
            finally:
                finished.set()

        thread = threading.Thread(target=consume, name="batchkimi-ray-results", daemon=True)
        thread.start()
        while not finished.is_set():
            await asyncio.sleep(0.1)
            if self.stopping and time.monotonic() - self._stop_time >= job.grace_s:
                finished.set()  # the grace is over: what is still in flight is sent again on resume
                break
        if failure and not self.stopping:
            raise failure[0]

    async def _take(self, rows: list[bytes]) -> None:
        s = self.summary
        for raw in rows:
            if raw.startswith(STATS):
                stats = orjson.loads(raw[len(STATS):])
                s.requests += stats["requests"]
                s.retries += stats["retries"]
                s.rate_limited += stats["rate_limited"]
                if stats.get("fallback") and not any(n.startswith("ray: a worker") for n in self.summary.notes):
                    self.summary.notes.append("ray: a worker could not reach the cluster limit and kept to its share")
                if stats.get("fatal"):
                    self.stop(stats["fatal"], fatal=stats["fatal"])
                elif stats.get("wait"):
                    until, message = orjson.loads(stats["wait"])
                    if s.wait_until is None:
                        s.wait_until, s.wait_reason = until, message
                    self.stop(f"the server asks this account to wait until {resume_time(until)}")
                elif stats.get("error"):
                    self.stop(stats["error"], error=JobError(stats["error"]))
                continue
            row = orjson.loads(raw)
            await self._finish(row)
            if row.get("status") in ("ok", "truncated"):
                self.gate.settle(Reservation(0.0, 0), row.get("cost_usd"), _tokens_of(row))
        # The actors send without asking the driver: the budget is checked as their rows come back,
        # so a Ray run can pass it by what its actors have in flight (the local engine never does).
        job, gate = self.job, self.gate
        if not self.stopping and ((job.max_cost_usd and gate.spent_usd >= job.max_cost_usd)
                                  or (job.max_total_tokens and gate.spent_tokens >= job.max_total_tokens)):
            s.budget_stop = gate.lines()[0]
            self.stop(f"stopping at the budget: {s.budget_stop}")


def run_on_ray(job: Job, *, hook: Hook = no_hook, api_key: str, overwrite: bool = False,
               install_signal_handlers: bool = False) -> Summary:
    """Connect to the job's cluster (``ray_address``; none: start a local one), run, disconnect."""
    ray = require_ray()
    if job.uses_simulator and job.ray_address not in (None, "local"):
        raise ConfigError("base_url = 'simulator' serves from this process only: on a remote cluster, run "
                          "`batchkimi simulate --host 0.0.0.0` and point base_url at it")
    started = not ray.is_initialized()
    if started:
        address = None if job.ray_address in (None, "local") else job.ray_address
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        ray.init(address=address, namespace="batchkimi", log_to_driver=False, configure_logging=False,
                 include_dashboard=False if address is None else None)
        quiet = logging.getLogger("ray.data")
        quiet.setLevel(logging.WARNING)  # our progress bar and summary say what its INFO lines say
        for handler in [*quiet.handlers, *logging.getLogger("ray").handlers]:
            handler.addFilter(_QuietProgressNote())
        quiet.addFilter(_QuietProgressNote())
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
    try:
        from ..api import loop_factory

        # Ray's workers do not run in this directory: every path they see is absolute.
        job = dataclasses.replace(job, **{k: str(Path(v).expanduser().resolve()) for k in ("input", "output", "media_root", "ca_file")
                                          if (v := getattr(job, k))})
        run = RayJobRun(job, api_key, hook=hook, overwrite=overwrite, install_signal_handlers=install_signal_handlers)
        with asyncio.Runner(loop_factory=loop_factory(job.event_loop)) as runner:
            return runner.run(run.execute())
    finally:
        if started:
            ray.shutdown()
