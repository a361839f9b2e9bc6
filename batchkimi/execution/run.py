"""The whole job as one object, :class:`JobRun`: open, feed, work, write, drain, close.

Its tasks live in one :class:`asyncio.TaskGroup` (the writer beside a group of the feeder and
``concurrency`` workers), so no task's failure goes unawaited and cancelling the run ends every
task. A row's failure is a row; anything else that goes wrong while a row is handled (a hook
that raises, a reader that hits a damaged file, a bug) stops the run like Ctrl-C: requests in
flight get their grace period, what is done is written, and the run raises a
:class:`~batchkimi.errors.JobError` naming the row.

A stop (a signal, a job-level API refusal, an error, the caller's ``stop`` event) sends nothing
new: the feeder stops, rows waiting for the limiter, a back-off or the queue are dropped at once
(they are pending: the next run sends them), and only requests already in flight get ``grace_s``
seconds to finish. A second signal, or the end of the grace period, cancels those too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .. import __version__
from ..config import SIMULATOR_PACING, Job, job_notices
from ..errors import ConfigError, FatalAPIError, JobError, OutputError
from ..events import Hook, Notice, RowFinished, RunStarted, SafeHook, Stopping
from ..input.folder import (
    INDEX,
    FolderScan,
    mark_gone,
    read_index,
    resume_marks,
    scan_folder,
    write_index,
)
from ..input.history import first_change, remember
from ..input.media import MediaSettings, has_media, known_from, settings_for
from ..input.reader import (
    InputScan,
    SourceRow,
    columns_seen,
    detect_format,
    read_rows,
    row_id,
    scan_input,
)
from ..output.parts import ResumeState
from ..output.results import invalid_row, kept_column_name, text
from ..output.sink import MANIFEST, Sink
from ..policy.breaker import FailureBreaker
from ..policy.budget import BudgetGate, output_spend
from ..request import Prepared, RowInvalid, build_request, thinking_budget_note
from ..scoring.grader import grade_pending, known_grades
from ..scoring.score import score_output, specs_of
from .row import (
    AccountWaiting,
    RowAbandoned,
    RowEngine,
    endpoint,
    limiter_of,
    policy_of,
    sent_max_tokens,
)
from .summary import Summary, resume_time

PREPARE_IN_THREAD = 32  # rows with media checked per trip to a worker thread
_FOLDER_COLUMN = re.compile(r"^column '(image|video)': ")
_END = object()  # the results queue's last item
_TICK = object()  # wakes the writer to fsync the journal


def kept_values(row: SourceRow, job: Job) -> dict[str, Any]:
    if not job.keep_columns:
        return {}
    data = row.data or {}
    return {kept_column_name(column): text(data.get(column)) for column in job.keep_columns}


def prepare_row(row: SourceRow, job: Job, fmt: str, scan: InputScan,
                media: MediaSettings | None = None, *, folder: bool = False) -> tuple[str, Prepared | str]:
    """(id, request) or (id, error message naming the place to fix). Reads the headers of the
    row's local images and videos: call it from a thread when :func:`row_has_media`. A
    ``folder`` row is a line of the media index: its id is the file's relative path."""
    if folder and row.data is not None:
        rid = str(row.data.get("id"))
        known = known_from(row.data)
        try:
            return rid, build_request(row.data, job, media=media, known={rid: known} if known is not None else None)
        except RowInvalid as exc:
            return rid, f"{rid}: {_FOLDER_COLUMN.sub('', str(exc))}"
        except Exception as exc:  # noqa: BLE001 - one file's oddity never stops the job
            return rid, f"{rid}: cannot make a request from this file ({type(exc).__name__}: {exc})"
    if row.error is not None or row.data is None:
        return f"{scan.id_prefix}{row.pos}", row.error or f"{row.where} is empty"
    rid = row_id(row, fmt, job.id_column, scan.has_id_column, scan.id_prefix)
    if rid is None:
        column = "custom_id" if fmt == "openai_batch" else job.id_column
        return f"{scan.id_prefix}{row.pos}", f"{row.where}: column '{column}' is missing or empty"
    try:
        return rid, build_request(row.data, job, batch_line=fmt == "openai_batch", media=media)
    except RowInvalid as exc:
        return rid, f"{row.where}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one row's odd values never stop the job
        return rid, f"{row.where}: cannot make a request from this row ({type(exc).__name__}: {exc})"


def row_has_media(row: SourceRow, media: MediaSettings, job: Job) -> bool:
    return row.data is not None and has_media(row.data, media, (job.messages_column, "body"))


def media_settings(job: Job, *, folder: bool) -> MediaSettings:
    """The job's media settings; a folder's index names each file in ``image`` or ``video``."""
    media = settings_for(job, Path(job.input or "."))
    return dataclasses.replace(media, image_columns=("image",), video_columns=("video",)) if folder else media


def input_format(job: Job) -> str:
    if not job.input:
        raise ConfigError("no input: set 'input' in the job file or pass --input")
    return detect_format(Path(job.input), job.input_format)


def open_folder(job: Job, index: Path, old: list[dict[str, Any]]) -> tuple[Path, InputScan, FolderScan]:
    """Walk the input folder against the previous index ``old``, write the new one to ``index``
    and scan it as the job's input."""
    assert job.input
    if not job.prompt_template:
        raise ConfigError("a folder of images and videos needs a prompt: set prompt_template (or pass --prompt)")
    folder = scan_folder(Path(job.input), old, tuple(job.include), tuple(job.exclude))
    write_index(index, folder.entries)
    scan = scan_input(index, "jsonl", "id") if folder.entries else InputScan(0, "", True, 0, 0)
    return index, scan, folder


def open_input(job: Job, manifest: dict[str, Any] | None) -> tuple[Path, str, InputScan]:
    """The input's path, format and scan (from the manifest when the file is unchanged)."""
    fmt = input_format(job)
    path = Path(job.input or "")
    scan: InputScan | None = None
    if manifest:
        old = manifest.get("input", {})
        try:
            st = path.stat()
            if old.get("size_bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and path.is_file():
                scan = InputScan(old["rows"], old["fingerprint"], old["has_id_column"], st.st_size, st.st_mtime_ns,
                                 old.get("id_prefix", "row-"))
        except (OSError, KeyError):
            scan = None
    if scan is None:
        scan = scan_input(path, fmt, job.id_column)
        if job.id_column != "id" and not scan.has_id_column and fmt != "openai_batch":
            raise ConfigError(f"id_column '{job.id_column}' is not a column of {path}")
    if job.keep_columns:
        seen = columns_seen(path, fmt)
        missing = [c for c in job.keep_columns if c not in seen]
        if missing:
            have = ", ".join(sorted(seen)[:20]) or "none"
            raise ConfigError(f"keep_columns names {', '.join(repr(c) for c in missing)}, not a column of {path} (it has: {have})")
    return path, fmt, scan


def refuse_foreign_output(out: Path) -> None:
    """Never write into, or delete, a non-empty directory that batchkimi did not make."""
    if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise OutputError(
            f"{out} is not empty and holds no {MANIFEST}: it is not a batchkimi output. "
            "Choose another --output; batchkimi will not write into or delete it."
        )


def check_resume(manifest: dict[str, Any] | None, job: Job, scan: InputScan | None, out: Path,
                 path: Path | None = None, fmt: str | None = None) -> bool:
    """Refuse to resume over results of another input (``scan`` None: a folder, whose index
    carries its own history) or of other requests. True when the input grew since (rows
    appended, files added: see :mod:`batchkimi.input.history`), which resumes."""
    if not manifest:
        return False
    fresh = f"Use a new --output, or pass --overwrite to delete {out} and start fresh."
    was_folder = manifest.get("input", {}).get("format") == "folder"
    if was_folder != (scan is None):
        kind = "a folder of images and videos" if was_folder else "a dataset file"
        raise OutputError(f"{out} holds the results of {kind}. {fresh}")
    old_input = manifest.get("input", {})
    grew = False
    if scan is not None and old_input.get("fingerprint") != scan.fingerprint:
        why = None
        if (old_input.get("has_id_column"), old_input.get("id_prefix", "row-")) != (scan.has_id_column, scan.id_prefix):
            why = "its ids are made differently now"
        elif path is not None and fmt is not None:
            why = first_change(out, path, fmt, old_input)
        if why is not None or path is None:
            raise OutputError(f"the input changed since {out} was written: {why or 'its fingerprint differs'}. "
                              f"Rows that only follow the old ones resume; changed rows do not. {fresh}")
        grew = True
    old = dict(manifest.get("request_settings", {}))
    new = orjson.loads(orjson.dumps(job.request_settings(fmt if scan is not None else "folder")))
    # Older outputs recorded 'auto' and the simulator's pacing: read them as this version would write them.
    if old.get("input_format") == "auto":
        old["input_format"] = new["input_format"] if fmt is not None or scan is None else "auto"
    if isinstance(old.get("simulator"), dict):
        old["simulator"] = {k: v for k, v in old["simulator"].items() if k not in SIMULATOR_PACING}
    # A key the old manifest does not record (added since) cannot be compared: it passes.
    changed = [k for k in sorted(new) if k in old and old.get(k) != new.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k, '(not recorded)')!r} -> {new.get(k)!r}" for k in changed[:6])
        why = ""
        if "base_url" in changed and "simulator" in (str(old.get("base_url")), str(new.get("base_url"))):
            why = " Answers from the simulator never pass for real ones (or the other way round)."
        raise OutputError(f"{out} was made by a job that sends different requests or sends them elsewhere ({diff}).{why} {fresh}")
    return grew


def manifest_of(job: Job, path: Path, fmt: str, scan: InputScan, old: dict[str, Any] | None, state: str,
                summary: Summary | None = None, folder: FolderScan | None = None,
                history: dict[str, Any] | None = None) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    runs = list((old or {}).get("runs", []))
    if summary is None:
        runs.append({"started": now, "batchkimi_version": __version__})
    elif runs:
        runs[-1].update({"finished": now, "state": state, **summary.as_dict()})
    return {
        "batchkimi_version": __version__,
        "state": state,
        "simulated": job.uses_simulator,
        "job": job.public_dict(),
        "request_settings": job.request_settings("folder" if folder is not None else fmt),
        "input": {
            "path": str(folder.root if folder is not None else path),
            "format": "folder" if folder is not None else fmt,
            "fingerprint": scan.fingerprint,
            "rows": scan.rows,
            "has_id_column": scan.has_id_column,
            "id_prefix": scan.id_prefix,
            "size_bytes": scan.size_bytes,
            "mtime_ns": scan.mtime_ns,
            **(history if history is not None else {k: v for k, v in (old or {}).get("input", {}).items() if k == "files"}),
        },
        "counts": summary.final_status if summary else (old or {}).get("counts", {}),
        "created": (old or {}).get("created", now),
        "updated": now,
        "runs": runs[-50:],
    }


class JobRun:
    """One run of a job over its output directory. Use :meth:`execute` once."""

    def __init__(self, job: Job, api_key: str, *, hook: Hook, overwrite: bool = False,
                 install_signal_handlers: bool = False, stop: asyncio.Event | None = None, transport: Any = None) -> None:
        if not job.output:
            raise ConfigError("no output: set 'output' in the job file or pass --output")
        self.job = job
        self.key = api_key
        self.hook = SafeHook(hook, self._hook_failed)
        self.overwrite = overwrite
        self.install_signal_handlers = install_signal_handlers
        self.external_stop = stop
        self.transport = transport
        self.sink = Sink(Path(job.output), job.keep_columns, job.rows_per_part)
        self.started = time.monotonic()
        self.stopping = False
        self.error: BaseException | None = None  # raised after the run wrote what it could
        self.fatal: str | None = None
        self.signals = 0
        self.engine: RowEngine | None = None
        self.feeder: asyncio.Task[None] | None = None
        self.workers: list[asyncio.Task[None]] = []
        self.delivering: set[asyncio.Task[Any]] = set()
        self._grace: asyncio.TimerHandle | None = None
        self._closed = False
        self._live = 0
        self._watcher: asyncio.Task[None] | None = None
        self._where = ""
        self.folder: FolderScan | None = None
        self.history: dict[str, Any] | None = None  # what the manifest records of the input's files, when new
        self.gate = BudgetGate(0.0, 0, job.price_table, job.model)  # replaced once the output's spend is known

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
        if self.engine is not None:
            self.engine.stop()
        if self.feeder is not None and self.feeder is not asyncio.current_task():
            self.feeder.cancel()
        me = asyncio.current_task()
        for w in self.workers:
            if w is me or w in self.delivering or (self.engine is not None and w in self.engine.sending):
                continue  # in flight, or handing over a paid answer: the grace period is theirs
            w.cancel()  # waiting for the queue, the limiter or a back-off: nothing was sent
        self._grace = asyncio.get_running_loop().call_later(self.job.grace_s, self._abort)

    def _abort(self) -> None:
        """The grace period is over (or a second signal came): cancel what is still in flight."""
        for w in self.workers:
            w.cancel()

    def _on_signal(self) -> None:
        self.signals += 1
        self.summary.interrupted = True
        if self.signals == 1:
            self.stop(f"interrupted: finishing requests in flight for up to {self.job.grace_s:g}s (again to stop now)")
        else:
            self._abort()

    def _hook_failed(self, exc: BaseException) -> None:
        self.stop(f"the progress hook raised {exc!r}", error=JobError(f"the progress hook raised {type(exc).__name__}: {exc}"))

    # ---- the run ---------------------------------------------------------------------------
    async def execute(self) -> Summary:
        job, out = self.job, self.sink.dir
        refuse_foreign_output(out)
        manifest = None if self.overwrite else self.sink.read_manifest()
        if input_format(job) == "folder":
            check_resume(manifest, job, None, out)
            self.sink.prepare(overwrite=self.overwrite)  # the index is the output's: lock first
            try:
                old = await asyncio.to_thread(read_index, out / INDEX)
                self.path, self.scan, self.folder = await asyncio.to_thread(open_folder, job, out / INDEX, old)
                self.fmt = "jsonl"
                del old  # a line per file: not kept for the whole run
            except BaseException:
                self.sink.unlock()
                raise
        else:
            self.path, self.fmt, self.scan = open_input(job, manifest)
            grew = check_resume(manifest, job, self.scan, out, self.path, self.fmt)
            self.sink.prepare(overwrite=self.overwrite)
            if manifest is None or grew:
                try:  # what a later run needs to tell a grown input from a changed one
                    self.history = await asyncio.to_thread(remember, out, self.path, self.fmt)
                except BaseException:
                    self.sink.unlock()
                    raise
        self.media = media_settings(job, folder=self.folder is not None)
        try:
            return await self._execute(manifest)
        finally:
            with contextlib.suppress(OSError):
                self.sink.journal.close()  # after a cancellation: the next run converts it
            self.sink.unlock()

    async def _execute(self, manifest: dict[str, Any] | None) -> Summary:
        job, sink, scan = self.job, self.sink, self.scan
        state = sink.compact(scan.rows)
        state.apply_rerun(frozenset(job.retry), job.effective_max_tokens)
        self.limit = min(scan.rows, job.limit) if job.limit is not None else scan.rows
        unsendable = 0
        if self.folder is not None:
            state, unsendable = await asyncio.to_thread(self._folder_state, state)
        self.done = state.done
        # a truncated row is sent again only with a larger budget than it had (a batch line may set its own)
        self.old_max_tokens = {} if {"truncated", "all"} & set(job.retry) else state.old_max_tokens()
        self.first_pending = state.first_pending()  # state.done is self.done: the marks above count
        already = int(self.done[: self.limit].sum()) - unsendable
        self.summary = Summary(str(sink.dir), self.limit - unsendable, already)
        if self.folder is not None:
            self.summary.notes = self.folder.lines()
            self.folder.entries = []  # the index is on disk; a dict per file is not kept for the run
        usd, tokens, self.counted_through = await asyncio.to_thread(output_spend, sink.dir, (manifest or {}).get("spend"))
        self.gate = BudgetGate(job.max_cost_usd, job.max_total_tokens, job.price_table, job.model, usd, tokens)
        self.manifest = manifest_of(job, self.path, self.fmt, scan, manifest, "running", folder=self.folder,
                                    history=self.history)
        self.manifest["spend"] = self._spend()
        sink.write_manifest(self.manifest)
        self.hook(RunStarted(self.limit, already, self.limit - already))
        for note in job_notices(job):
            self.hook(Notice(note))
            self.summary.notes.append(f"warning: {note}")
        self.budget_lines = LineBudgetNotes(job, self.hook)
        # Bounded queues: flat memory whatever the dataset's size.
        self.results: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(2 * job.concurrency, 1024))
        self.work: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(2 * job.concurrency, 64))
        n_workers = max(1, min(job.concurrency, self.limit - already))
        loop = asyncio.get_running_loop()
        installed = []
        if self.install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._on_signal)
                    installed.append(sig)
        try:
            opened = contextlib.nullcontext(self.transport) if self.transport is not None else endpoint(job, self.key)
            async with opened as transport:
                limiter = limiter_of(job)
                breaker = FailureBreaker(job.stop_after_failures)
                self.engine = RowEngine(job, transport, limiter, policy_of(job), hook=self.hook, breaker=breaker)
                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._write(), name="batchkimi-writer")
                        group.create_task(self._produce(n_workers), name="batchkimi-producers")
                except BaseExceptionGroup as eg:
                    raise _first_error(eg) from None
                # added to: a Ray run's actors have counted theirs in already
                self.summary.requests += self.engine.requests
                self.summary.retries += self.engine.retries
                self.summary.rate_limited += limiter.rate_limited
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            if self._grace is not None:
                self._grace.cancel()
        return await self._close()

    def _spend(self, through: int | None = None) -> dict[str, Any]:
        """The output's spend for the manifest: every run's, and the last part it counts."""
        return {"usd": round(self.gate.spent_usd, 8), "tokens": self.gate.spent_tokens,
                "through_part": self.counted_through if through is None else through}

    def _folder_state(self, state: ResumeState) -> tuple[ResumeState, int]:
        """A folder's resume state: changed files pending again, gone files never sent (their
        rows marked); and how many gone files below the limit have no row at all."""
        assert self.folder is not None
        sink, entries = self.sink, self.folder.entries
        if mark_gone(sink, entries):
            state = sink.compact(self.scan.rows)
            state.apply_rerun(frozenset(self.job.retry), self.job.effective_max_tokens)
        gone = resume_marks(sink.dir, self.folder, state.done)
        gone = gone[gone < self.limit]
        has_row = np.zeros(len(state.done), dtype=bool)
        has_row[state.latest_rows] = True
        return state, int((~has_row[gone]).sum())

    async def _produce(self, n_workers: int) -> None:
        """The feeder and the workers; when they are all done, the writer may finish."""
        try:
            async with asyncio.TaskGroup() as group:
                self.feeder = group.create_task(self._feed(n_workers), name="batchkimi-feeder")
                self.workers = [group.create_task(self._work(), name=f"batchkimi-worker-{i}") for i in range(n_workers)]
                self._live = n_workers
                if self.external_stop is not None:
                    self._watcher = group.create_task(self._watch(self.external_stop))
        except Exception as exc:  # noqa: BLE001 - a bug in a task: stop, write what is done, then raise it
            self.error = self.error or _first_error(exc)
        finally:
            self._closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.results.put_nowait(_END)

    async def _watch(self, event: asyncio.Event) -> None:
        """The caller's stop event; cancelled when the last worker ends."""
        await event.wait()
        self.summary.interrupted = True
        self.stop("stopped by the caller")

    def _rows_to_send(self) -> Iterator[SourceRow]:
        """Input rows not yet done, below the limit, until a stop."""
        done, limit = self.done, self.limit
        for batch in read_rows(self.path, self.fmt, skip_until=min(self.first_pending, limit)):
            for row in batch:
                if row.pos >= limit or self.stopping:
                    return
                if row.pos < len(done) and done[row.pos]:
                    continue
                self._where = row.where
                yield row

    async def _feed(self, n_workers: int) -> None:
        job = self.job
        self._where = str(self.path)
        media, folder, fmt, scan = self.media, self.folder is not None, self.fmt, self.scan
        held: list[SourceRow] = []  # rows with media, prepared together in a thread

        def prepare_held(rows: list[SourceRow]) -> list[tuple[str, Prepared | str]]:
            return [prepare_row(r, job, fmt, scan, media, folder=folder) for r in rows]

        async def flush() -> None:
            rows = held[:]
            held.clear()
            for row, (rid, prepared) in zip(rows, await asyncio.to_thread(prepare_held, rows), strict=True):
                await self._hand_over(row, rid, prepared)

        try:
            for n, row in enumerate(self._rows_to_send()):
                if row_has_media(row, media, job):  # reads file headers: not on the event loop
                    held.append(row)
                    if len(held) >= PREPARE_IN_THREAD:
                        await flush()
                    continue
                if held:
                    await flush()
                rid, prepared = prepare_row(row, job, fmt, scan, media)
                await self._hand_over(row, rid, prepared)
                if n % 1024 == 1023:
                    await asyncio.sleep(0)  # let the workers and the writer in on a fast reader
            if held and not self.stopping:
                await flush()
        except JobError as exc:
            self.stop(str(exc), error=exc)
            return
        except Exception as exc:  # noqa: BLE001 - a damaged file or a bug: the job stops, naming the place
            where = self._where
            self.stop(f"reading {where} failed", error=JobError(f"reading {where} failed: {type(exc).__name__}: {exc}"))
            return
        for _ in range(n_workers):
            await self.work.put(None)

    async def _hand_over(self, row: SourceRow, rid: str, prepared: Prepared | str) -> None:
        """A prepared row to the workers; a row that cannot be sent straight to the writer."""
        if isinstance(prepared, str):
            inv = invalid_row(rid, row.pos, prepared)
            inv.update(kept_values(row, self.job))
            await self._finish(inv)
        elif (old := self.old_max_tokens.get(row.pos)) is not None and (sent_max_tokens(prepared.body) or 0) <= old:
            self.summary.already_done += 1  # truncated at this very budget before: it would truncate again
        else:
            if self.fmt == "openai_batch":
                self.budget_lines.check(prepared, row.where)
            await self.work.put((row.pos, rid, prepared, kept_values(row, self.job), row.where))
            self.summary.sent_rows += 1

    async def _work(self) -> None:
        engine, gate = self.engine, self.gate
        assert engine is not None
        task = asyncio.current_task()
        try:
            while not self.stopping:
                item = await self.work.get()
                if item is None or self.stopping:
                    return
                pos, rid, prepared, kept, where = item
                held = await gate.admit(prepared.prompt_tokens_estimate, sent_max_tokens(prepared.body))
                if isinstance(held, str):  # could never fit the budget: this row stays pending
                    if self.summary.budget_stop is None:
                        self.summary.budget_stop = held
                    self.stop(f"stopping at the budget: {held}")
                    return
                if self.stopping:
                    gate.settle(held, 0.0, 0)
                    return
                try:
                    row = await engine.process(rid, pos, prepared)
                except RowAbandoned:
                    gate.settle(held, 0.0, 0)  # not sent, or cut in its grace period: its usage is unknown
                    return
                except FatalAPIError as exc:
                    gate.settle(held, 0.0, 0)
                    self.stop(str(exc), fatal=str(exc))
                    return
                except AccountWaiting as exc:  # the row stays pending: nothing about it failed
                    gate.settle(held, 0.0, 0)
                    s = self.summary
                    if s.wait_until is None:
                        s.wait_until, s.wait_reason = exc.until_epoch_s, exc.message
                    self.stop(f"the server asks this account to wait until {resume_time(exc.until_epoch_s)}")
                    return
                except BaseException as exc:
                    gate.settle(held, 0.0, 0)
                    if not isinstance(exc, Exception):
                        raise
                    self.stop(f"unexpected error on {where}",
                              error=JobError(f"unexpected error on {where} (id {rid}): {type(exc).__name__}: {exc}"))
                    return
                row.update(kept)
                self._account(row)
                answered = row["status"] in ("ok", "truncated")
                gate.settle(held, row.get("cost_usd") if answered else 0.0,
                            _tokens_of(row) if answered else 0)
                self.delivering.add(task)  # type: ignore[arg-type]
                try:
                    await self.results.put(row)  # a paid answer: never cancelled before it is queued
                finally:
                    self.delivering.discard(task)  # type: ignore[arg-type]
        finally:
            self._live -= 1
            if self._live == 0 and self._watcher is not None:
                self._watcher.cancel()

    async def _finish(self, row: dict[str, Any]) -> None:
        self._account(row)
        await self.results.put(row)

    def _account(self, row: dict[str, Any]) -> None:
        s = self.summary
        status = row["status"]
        s.run_status[status] += 1
        s.prompt_tokens += row.get("prompt_tokens") or 0
        s.completion_tokens += row.get("completion_tokens") or 0
        s.cached_tokens += row.get("cached_tokens") or 0
        if status in ("ok", "truncated"):
            if row.get("total_tokens") is None:
                s.rows_without_usage += 1
            if row.get("cost_usd") is None:
                s.rows_without_cost += 1
            else:
                s.cost_usd += row["cost_usd"]
        if status != "ok":
            message = row.get("error_message") or ""
            s.errors[f"{row.get('error_type')}: {message[:160]}{'...' if len(message) > 160 else ''}"] += 1
        self.hook(RowFinished(status, row.get("total_tokens") or 0, row.get("attempts") or 0))

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
                if q.empty() and self._closed:
                    return
                batch = [await q.get()]
                while not q.empty():
                    batch.append(q.get_nowait())
                end = False
                rows = []
                for r in batch:
                    if r is _END:
                        end = True
                    elif r is not _TICK:
                        rows.append(r)
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

    async def _close(self) -> Summary:
        job, sink, summary = self.job, self.sink, self.summary
        await asyncio.to_thread(sink.close)
        below = self.limit if job.limit is not None else None
        if summary.run_status and len(sink.state.latest_rows):
            # Rows written before this run may now be superseded: rewrite those parts.
            sink.compact(self.scan.rows)
            summary.final_status = sink.status_counts(below=below)
        else:
            # Nothing older to supersede (a fresh run, or one that sent nothing): no need to re-read.
            final = Counter(sink.status_counts(below=below))
            final.update(summary.run_status)
            summary.final_status = dict(final)
        specs = specs_of(job.extract, job.score, job.tools)
        if not specs.empty:
            try:
                grades = None
                if specs.score is not None and specs.score.method == "model" and not (
                        self.error or self.fatal or summary.interrupted or summary.budget_stop):
                    graded = await grade_pending(sink.dir, job, specs, self.key)
                    summary.notes.append(f"model grader: {graded['graded_now']} answers graded now, "
                                         f"{graded['answers']} in all")
                    grades = await asyncio.to_thread(known_grades, sink.dir)
                summary.scores = await asyncio.to_thread(score_output, sink.dir, specs, grades)
            except Exception as exc:  # noqa: BLE001 - the results stand; their scores can be made again
                summary.notes.append(f"scoring failed ({type(exc).__name__}: {exc}); "
                                     f"run `batchkimi score {sink.dir}` to try again")
        summary.notes.extend(self.budget_lines.lines())
        summary.wall_s = time.monotonic() - self.started
        summary.fatal = self.fatal
        if self.hook.error is not None and self.error is None:
            self.error = JobError(f"the progress hook raised {type(self.hook.error).__name__}: {self.hook.error}")
        state = ("failed" if self.error or self.fatal else "interrupted" if summary.interrupted
                 else "waiting for the account" if summary.wait_until is not None
                 else "stopped at the budget" if summary.budget_stop else "finished")
        summary.notes.extend(self.gate.lines())
        final = manifest_of(job, self.path, self.fmt, self.scan, self.manifest, state, summary, self.folder, self.history)
        final["spend"] = self._spend(through=sink.last_part)
        sink.write_manifest(final)
        if self.error is not None:
            raise self.error
        return summary


class LineBudgetNotes:
    """Batch lines that set their own thinking budget under Kimi's floor: the first is said at
    once, the count at the end."""

    def __init__(self, job: Job, hook: Any = None) -> None:
        self.job, self.hook = job, hook
        self.count = 0
        self.first = ""

    def check(self, prepared: Prepared, where: str) -> None:
        if prepared.body.get("max_tokens") == self.job.effective_max_tokens:
            return  # the job's own budget: said once for the job
        note = thinking_budget_note(prepared, self.job, f"the OpenAI batch line at {where}")
        if note is None:
            return
        self.count += 1
        if self.count == 1:
            self.first = note
            if self.hook is not None:
                self.hook(Notice(note))

    def lines(self) -> list[str]:
        if not self.count:
            return []
        return [f"warning: {self.first}" + (f" ({self.count:,} such lines in all)" if self.count > 1 else "")]


def _tokens_of(row: dict[str, Any]) -> int | None:
    """An answer's tokens (None: the server reported none)."""
    if row.get("prompt_tokens") is None and row.get("completion_tokens") is None:
        return None
    return (row.get("prompt_tokens") or 0) + (row.get("completion_tokens") or 0)


def _first_error(eg: BaseException) -> BaseException:
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
