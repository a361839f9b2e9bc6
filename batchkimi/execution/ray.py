"""The Ray executor (``engine = "ray"``): the same run, its rows sent by the actors of a cluster.

The run (:class:`~batchkimi.execution.run.Run`) does on the driver what it does for a local
run: the plan, the manifest, the one writer, the summary, the budget, signals. What it hands to
Ray is the middle: :class:`RayExecutor` cuts the plan's input into blocks of
``ray_block_rows`` rows (byte offsets of a JSONL file, row ranges of a Parquet row group; the
rows themselves are not read here), and a Ray Dataset of those blocks, one Ray block each, goes
through ``map_batches`` on a pool of actors. Each actor (:class:`BlockWorker`) reads its block's
rows from the input, prepares them with :func:`~batchkimi.execution.rows.prepare_row` and sends
them with batchkimi's own :class:`~batchkimi.execution.row.RowEngine`: one code path for a
request, local or on a cluster. The block is the unit of commit: its result rows come back
together and are journaled at once.

One limit for the cluster: a named actor per (endpoint, key) (:mod:`.ray_limiter`).

Stopping: the driver sets a per-run control actor's event; every worker's block is watching
it (one waiting call, no polling), starts no new attempt (rows not sent stay pending), and its
requests in flight get ``grace_s``. What came back is written. Resume after any crash sends
again only the rows of blocks that were in flight and not yet written.

Ray is imported here only; ``import batchkimi`` never imports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..config import Job
from ..errors import ConfigError, FatalAPIError, JobError
from ..http.transport import Transport
from ..input.blocks import jsonl_block_rows, jsonl_blocks, parquet_block_rows, parquet_blocks
from ..output.results import invalid_row
from ..policy.breaker import FailureBreaker
from ..policy.budget import BudgetGate, Reservation
from ..storage.location import is_url
from .ray_limiter import LeasedLimiter, limit_actor, limit_name
from .row import AccountWaiting, RowAbandoned, RowEngine, policy_of, sent_max_tokens, timeouts_of
from .rows import kept_values, prepare_row, tokens_of

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("batchkimi.ray")

STATS = b"__batchkimi_stats__"  # the marker of a block's last record: the worker's counters


def require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("engine = 'ray' needs Ray, which is not installed here: pip install 'batchkimi[ray]' "
                          "(or run without --engine ray)") from None
    return ray


class BudgetKeeper:
    """The body of a per-run (async) actor holding the job's budget for every worker: a request is
    sent only once it is admitted here (:class:`~batchkimi.policy.budget.BudgetGate`: the spend so
    far plus the worst case of everything in flight, cluster-wide, stays within the budget)."""

    def __init__(self, max_usd: float, max_tokens: int, prices: Any, model: str, spent_usd: float, spent_tokens: int) -> None:
        self.gate = BudgetGate(max_usd, max_tokens, prices, model, spent_usd, spent_tokens)

    async def admit(self, prompt_tokens: int, max_tokens: int | None) -> tuple[float, int] | str:
        held = await self.gate.admit(prompt_tokens, max_tokens)
        return held if isinstance(held, str) else (held.usd, held.tokens)

    def settle(self, held: tuple[float, int], usd: float | None, tokens: int | None) -> None:
        self.gate.settle(Reservation(*held), usd, tokens)


class RunControl:
    """The body of a per-run (async) actor: the event of the driver asking every worker to stop."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    def stop(self) -> None:
        self.stopped.set()

    async def wait(self) -> bool:
        await self.stopped.wait()
        return True


# ---- the workers ---------------------------------------------------------------------------
class BlockWorker:
    """A Ray Data actor: one block of input rows in, their result rows out (as JSON bytes, and a
    last record with this worker's counters since its previous block)."""

    def __init__(self, *, job: Job, key: str, url: str, ca_pem: bytes | None, fmt: str, scan: Any, media: Any,
                 folder: bool, limit: Any, control: Any, workers: int, budget: Any = None) -> None:
        self.job, self.key, self.url, self.ca_pem = job, key, url, ca_pem
        self.budget = budget  # the run's BudgetKeeper, when the job has a budget
        self.fmt, self.scan, self.media, self.folder = fmt, scan, media, folder
        self.limit, self.control, self.workers = limit, control, workers
        self.engine: RowEngine | None = None
        self.reported = (0, 0, 0)
        # The actor's transport lives as long as the actor (its connections are reused block after
        # block); Ray Data gives a map actor no async close, so the stack ends with its process.
        self._resources = contextlib.AsyncExitStack()

    def __repr__(self) -> str:  # never show the key
        return f"BlockWorker({self.url!r})"

    async def _engine(self) -> RowEngine:
        if self.engine is None:
            job = self.job
            transport = await self._resources.enter_async_context(
                Transport(self.url, self.key, timeouts_of(job), ca_file=job.ca_file, ca_pem=self.ca_pem))
            limiter = LeasedLimiter(self.limit, rpm=job.rpm, tpm=job.tpm, concurrency=job.concurrency,
                                    workers=self.workers, max_tokens=job.effective_max_tokens)
            self.engine = RowEngine(job, transport, limiter, policy_of(job), breaker=FailureBreaker(job.stop_after_failures))
        return self.engine

    def _read(self, desc: dict[str, Any]) -> list[tuple[Any, str, Any, dict[str, Any]]]:
        """The block's rows not yet done, prepared (in a thread: it reads files)."""
        if desc["kind"] == "parquet":
            rows = parquet_block_rows(desc["file"], desc["first_in_file"], desc["start"], desc["stop"], dict(self.job.storage))
        else:
            rows = jsonl_block_rows(Path(desc["path"]), desc["offset"], desc["lines"], desc["start"], desc["stop"],
                                    url=desc.get("url"), end=desc.get("end"), options=dict(self.job.storage))
        skip = set(desc["skip"])
        out = []
        for row in rows:
            if row.pos in skip:
                continue
            rid, prepared = prepare_row(row, self.job, self.fmt, self.scan, self.media, folder=self.folder)
            out.append((row, rid, prepared, kept_values(row, self.job)))
        return out

    async def _watch(self, engine: RowEngine) -> None:
        """Wait for the run's stop (one call the control actor answers when it comes)."""
        try:
            await self.control.wait.remote()
        except Exception:  # noqa: BLE001 - the driver is gone: Ray ends this actor with it
            log.warning("batchkimi: the run's control actor cannot be reached", exc_info=True)
            return
        engine.stop()

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
                done.append(orjson.dumps({**invalid_row(rid, row.pos, prepared), **kept}, option=orjson.OPT_SERIALIZE_NUMPY))
                return
            held: Any = None
            if self.budget is not None:
                held = await self.budget.admit.remote(prepared.prompt_tokens_estimate, sent_max_tokens(prepared.body))
                if isinstance(held, str):  # could never fit: the row stays pending, the driver stops the run
                    trouble.setdefault("budget", held)
                    engine.stop()
                    return
            try:
                result = await engine.process(rid, row.pos, prepared)
            except BaseException as exc:
                if held is not None:
                    self.budget.settle.remote(held, 0.0, 0)  # nothing came back: nothing known spent
                if isinstance(exc, RowAbandoned):
                    return
                if isinstance(exc, FatalAPIError):
                    trouble.setdefault("fatal", str(exc))
                elif isinstance(exc, AccountWaiting):  # the row stays pending; the driver stops the run
                    trouble.setdefault("wait", orjson.dumps([exc.until_epoch_s, exc.message]).decode())
                elif isinstance(exc, Exception):  # the row's request path failed: the job stops, as locally
                    trouble.setdefault("error", f"unexpected error on {row.where} (id {rid}): {type(exc).__name__}: {exc}")
                else:
                    raise
                engine.stop()
                return
            if held is not None:
                answered = result["status"] in ("ok", "truncated")
                self.budget.settle.remote(held, result.get("cost_usd") if answered else 0.0,
                                          tokens_of(result) if answered else 0)
            result.update(kept)
            done.append(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))

        async with asyncio.TaskGroup() as group:
            watcher = group.create_task(self._watch(engine)) if not engine.stopping else None
            async with asyncio.TaskGroup() as sends:
                for item in rows:
                    sends.create_task(one(*item))
            if watcher is not None:
                watcher.cancel()
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


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# ---- the driver ------------------------------------------------------------------------------
class RayExecutor:
    """Sends a run's rows from a Ray cluster's actors (see the module docstring). ``base_url``
    and ``ca_pem``: where the actors send (the door resolves a simulator to its URL)."""

    def __init__(self, api_key: str, *, base_url: str, ca_pem: bytes | None = None) -> None:
        self.key, self.base_url, self.ca_pem = api_key, base_url, ca_pem
        self.control: Any = None
        self.grace_over = asyncio.Event()

    def stop(self, run: Run) -> None:
        if self.control is not None:
            self._tell_stop()

    def _tell_stop(self) -> None:
        try:
            self.control.stop.remote()
        except Exception:  # noqa: BLE001 - the control actor is gone: the workers end with the run
            log.warning("batchkimi: could not tell the workers to stop", exc_info=True)

    def abort(self) -> None:
        self.grace_over.set()

    def _blocks(self, run: Run) -> list[dict[str, Any]]:
        """Blocks holding at least one pending row below the limit; each names its done rows."""
        plan, job = run.plan, run.job
        assert plan is not None
        done, limit, n = plan.done, plan.limit, job.ray_block_rows
        blocks: list[dict[str, Any]] = []
        # an input in a store: the actors read each block from it (no disk shared with this one)
        remote = job.input if job.input and is_url(job.input) else None

        def where(file: Path) -> str:
            if remote is None:
                return str(Path(file).resolve())
            rel = Path(file).relative_to(plan.path).as_posix() if Path(plan.path).is_dir() else ""
            return f"{remote.rstrip('/')}/{rel}" if rel else remote

        if plan.fmt == "parquet":
            cuts: Any = ({"kind": "parquet", "file": where(Path(f)), "first_in_file": first, "start": a, "stop": b}
                         for f, first, a, b in parquet_blocks(plan.path, n, limit))
        else:
            cuts = ({"kind": "jsonl", "path": str(Path(plan.path).resolve()), "url": remote, "offset": off,
                     "lines": lines, "start": a, "stop": b, "end": end}
                    for off, lines, a, b, end in jsonl_blocks(plan.path, n, limit))
        for desc in cuts:
            a, b = desc["start"], desc["stop"]
            flags = done[a:b]
            if flags.all():
                continue
            desc["skip"] = (a + flags.nonzero()[0]).tolist() if flags.any() else []
            desc["block"] = len(blocks)
            blocks.append(desc)
        return blocks

    async def execute(self, run: Run) -> None:
        import ray

        job, plan = run.job, run.plan
        assert plan is not None
        blocks = await asyncio.to_thread(self._blocks, run)
        if not blocks or run.stopping:
            return
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = max(1, min(job.ray_actors or max(1, cpus - 1), len(blocks)))
        # Leave a CPU for Ray Data's own tasks: with every CPU taken by actors a run can hang.
        per_actor = min(1.0, max(0.05, (cpus - 1) / actors)) if cpus > 1 else 0.5
        # Blocks an actor works on at once: enough rows for its share of the concurrency, and one
        # more block to start while the last rows of the others finish.
        blocks_at_once = min(64, max(2, math.ceil(math.ceil(job.concurrency / actors) / job.ray_block_rows) + 1))
        limit = await asyncio.to_thread(limit_actor, self.base_url, self.key, job.rpm, job.tpm, job.concurrency)
        self.control = ray.remote(RunControl).options(num_cpus=0, max_concurrency=10_000).remote()
        budget = None
        if job.max_cost_usd or job.max_total_tokens:
            spent_usd, spent_tokens, _ = plan.spent
            budget = ray.remote(BudgetKeeper).options(num_cpus=0, max_concurrency=10_000).remote(
                job.max_cost_usd, job.max_total_tokens, job.price_table, job.model, spent_usd, spent_tokens)
        if run.stopping:
            self._tell_stop()
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
            fn_constructor_kwargs={"job": job, "key": self.key, "url": self.base_url,
                                   "ca_pem": self.ca_pem, "fmt": plan.fmt, "scan": plan.scan,
                                   "media": plan.media, "folder": plan.folder is not None, "limit": limit,
                                   "control": self.control, "workers": actors, "budget": budget})
        run.summary.notes.append(f"ray: {_n(len(blocks), 'block')} of up to {job.ray_block_rows} rows on {_n(actors, 'actor')} "
                                 f"({per_actor:g} CPU and up to {blocks_at_once} blocks at once each; "
                                 f"cluster limit actor {limit_name(self.base_url, self.key)})")
        batches = iter(out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))
        end: Any = object()
        loop = asyncio.get_running_loop()
        # Ray's iterator blocks: one batch at a time from it, in a thread of a pool of one that
        # each step awaits. Not the default pool: when the grace period ends with a batch still
        # being waited for, the run returns at once, and the loop's shutdown would join that
        # thread; ending the Ray session after the run ends its wait.
        reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchkimi-ray-results")
        grace_over: asyncio.Future[Any] = asyncio.ensure_future(self.grace_over.wait())
        try:
            while True:
                nxt: asyncio.Future[Any] = loop.run_in_executor(reader, next, batches, end)
                await asyncio.wait({nxt, grace_over}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # the grace is over: what is still in flight is sent again on resume
                    nxt.cancel()
                    return
                batch = nxt.result()
                if batch is end:
                    return
                await self._take(run, batch.column("row").to_pylist())
        finally:
            grace_over.cancel()
            reader.shutdown(wait=False, cancel_futures=True)

    async def _take(self, run: Run, rows: list[bytes]) -> None:
        s, gate, job = run.summary, run.gate, run.job
        for raw in rows:
            if raw.startswith(STATS):
                stats = orjson.loads(raw[len(STATS):])
                s.requests += stats["requests"]
                s.retries += stats["retries"]
                s.rate_limited += stats["rate_limited"]
                if stats.get("fallback") and not any(n.startswith("ray: a worker") for n in s.notes):
                    s.notes.append("ray: a worker could not reach the cluster limit and kept to its share")
                if stats.get("fatal"):
                    run.stop(stats["fatal"], fatal=stats["fatal"])
                elif stats.get("wait"):
                    until, message = orjson.loads(stats["wait"])
                    run.wait_for_account(until, message)
                elif stats.get("error"):
                    run.stop(stats["error"], error=JobError(stats["error"]))
                elif stats.get("budget"):
                    run.at_budget(stats["budget"])
                continue
            row = orjson.loads(raw)
            await run.deliver(row)
            if row.get("status") in ("ok", "truncated"):
                gate.settle(Reservation(0.0, 0), row.get("cost_usd"), tokens_of(row))
        # The actors ask the run's BudgetKeeper before each request; this is a second look.
        if not run.stopping and ((job.max_cost_usd and gate.spent_usd >= job.max_cost_usd)
                                 or (job.max_total_tokens and gate.spent_tokens >= job.max_total_tokens)):
            run.at_budget(gate.lines()[0])


@contextlib.contextmanager
def ray_session(job: Job) -> Any:
    """Connect to the job's cluster (``ray_address``; none: start a local one) for the run, and
    disconnect after (a cluster this started is shut down)."""
    ray = require_ray()
    if job.uses_simulator and job.ray_address not in (None, "local"):
        raise ConfigError("base_url = 'simulator' serves from this process only: on a remote cluster, run "
                          "`batchkimi simulate --host 0.0.0.0` and point base_url at it")
    started = not ray.is_initialized()
    if started:
        address = None if job.ray_address in (None, "local") else job.ray_address
        ray.init(address=address, namespace="batchkimi", log_to_driver=False, configure_logging=False,
                 include_dashboard=False if address is None else None)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar and summary say what its INFO says
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
