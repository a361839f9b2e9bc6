"""A run's :class:`Plan`: what to send and what is done, decided once before anything is sent.

:func:`open_plan` opens the input (one scan: rows, fingerprint, duplicate ids; a folder is
walked into its index), checks that the output may be resumed, takes the output's lock, turns
a killed run's journal into parts, and reads which rows are done (:mod:`batchkimi.policy.rerun`
says which of them a rerun sends again) and what the output has spent. The plan is frozen and
shared by ``--dry-run`` (:func:`dry_plan`, which writes nothing), the local executor and Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import Job
from ..errors import ConfigError
from ..input.folder import INDEX, FolderScan, read_index, scan_folder, write_index
from ..input.history import remember
from ..input.media import MediaSettings, settings_for
from ..input.reader import InputScan, columns_seen, detect_format, scan_input
from ..output import parts
from ..output.parts import ResumeState
from ..output.sink import Sink, check_output
from ..output.spend import output_spend
from ..storage.location import is_url
from ..storage.remote import fetch_input
from .resume import check_resume, refuse_foreign_output


@dataclass(frozen=True)
class Plan:
    """What a run of ``job`` sends (every position not ``done``, below ``limit``) and where it
    comes from: ``path`` in ``fmt`` (a folder's index for a folder input)."""

    job: Job
    path: Path
    fmt: str
    scan: InputScan
    media: MediaSettings
    folder: FolderScan | None
    limit: int  # positions are output positions: input position x samples + sample
    done: np.ndarray  # per position: not to be sent by this run
    first_pending: int
    already: int  # rows below the limit done before this run
    to_send: int  # rows below the limit this run may send
    old_max_tokens: dict[int, int]  # truncated rows' budgets: sent again only with a larger one
    manifest: dict[str, Any] | None  # the output's manifest before this run
    history: dict[str, Any] | None  # what the manifest records of the input, when it is new
    spent: tuple[float, int, int]  # the output's spend before this run: usd, tokens, last part counted


def input_path(job: Job) -> Path:
    """The job's input as a local path: a URL's objects are fetched into a local copy first
    (again only when they changed). Called once per plan: the path is handed on."""
    if not job.input:
        raise ConfigError("no input: set 'input' in the job file or pass --input")
    return fetch_input(job.input, dict(job.storage)) if is_url(job.input) else Path(job.input)


def media_settings(job: Job, source: Path, *, folder: bool) -> MediaSettings:
    """The job's media settings (``source``: the input's local path); a folder's index names
    each file in ``image`` or ``video``."""
    media = settings_for(job, source)
    return dataclasses.replace(media, image_columns=("image",), video_columns=("video",)) if folder else media


def open_folder(job: Job, source: Path, index: Path, old: list[dict[str, Any]]) -> tuple[Path, InputScan, FolderScan]:
    """Walk the input folder ``source`` against the previous index ``old``, write the new one to
    ``index`` and scan it as the job's input."""
    if not job.prompt_template:
        raise ConfigError("a folder of images and videos needs a prompt: set prompt_template (or pass --prompt)")
    folder = scan_folder(source, old, tuple(job.include), tuple(job.exclude))
    write_index(index, folder.entries)
    scan = scan_input(index, "jsonl", "id") if folder.entries else InputScan(0, "", True, 0, 0)
    return index, scan, folder


def open_input(job: Job, path: Path, fmt: str, manifest: dict[str, Any] | None) -> tuple[Path, str, InputScan]:
    """The input's path, format and scan (from the manifest when the file is unchanged)."""
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


# ---- a folder's rows against its output ----------------------------------------------------
def stale_positions(out: Path, entries: list[dict[str, Any]]) -> np.ndarray:
    """Positions whose newest output row was made from other content than the file now holds
    (known only for files hashed by a walk: those whose size or time once changed)."""
    want = {pos: e["sha256"] for pos, e in enumerate(entries) if e.get("sha256") and not e.get("gone")}
    if not want:
        return np.zeros(0, dtype=np.int64)
    wanted = pa.array(np.fromiter(want, dtype=np.int64, count=len(want)))
    stale = []
    for t in parts.iter_newest(out, ["row", "media"]):
        t = t.filter(pc.is_in(t.column("row"), value_set=wanted))  # only those rows reach Python
        for r, m in zip(t.column("row").to_pylist(), t.column("media").to_pylist(), strict=True):
            if ((m[0] or {}).get("sha256") if m else None) != want[r]:
                stale.append(r)
    return np.array(sorted(stale), dtype=np.int64)


def resume_marks(out: Path, scan: FolderScan, done: np.ndarray) -> np.ndarray:
    """A folder's resume state on ``done`` (in place): files whose content changed are pending
    again (``scan.changed``), gone files are never sent. The gone positions."""
    stale = stale_positions(out, scan.entries)
    done[stale] = False
    scan.changed = stale.tolist()
    gone = np.fromiter((p for p, e in enumerate(scan.entries) if e.get("gone")), dtype=np.int64)
    done[gone[gone < len(done)]] = True
    return gone


def mark_gone(sink: Sink, entries: list[dict[str, Any]]) -> int:
    """Give the rows of gone files ``media_gone = true`` (and take it from files that came back),
    as a new part that supersedes their old copies; the number of rows changed. Call it after
    :meth:`~batchkimi.output.sink.Sink.compact`: each row is then in one part only."""
    gone = np.fromiter((pos for pos, e in enumerate(entries) if e.get("gone")), dtype=np.int64)
    tables = []
    for path in parts.part_paths(sink.dir):
        t = pq.read_table(path, columns=["row", "media_gone"])
        rows = t.column("row").to_numpy()
        marked = pc.fill_null(t.column("media_gone"), False).to_numpy(zero_copy_only=False)
        flip = marked != np.isin(rows, gone)
        if flip.any():
            t = pq.read_table(path).filter(pa.array(flip))
            t = t.set_column(t.schema.get_field_index("media_gone"), "media_gone",
                             pa.array(np.isin(t.column("row").to_numpy(), gone)).cast(pa.bool_()))
            tables.append(t)
    if not tables:
        return 0
    changed = pa.concat_tables(tables)
    # a file that came back is unmarked with null, as rows of files never gone are
    changed = changed.set_column(changed.schema.get_field_index("media_gone"), "media_gone",
                                 pc.if_else(changed.column("media_gone"), True, pa.scalar(None, pa.bool_())))
    sink.write_part(changed)
    return changed.num_rows


# ---- the plan ---------------------------------------------------------------------------------
def _decide(job: Job, state: ResumeState, scan: InputScan, folder: FolderScan | None, out: Path) -> dict[str, Any]:
    """Which rows this run sends: the rerun rules, then a folder's changed and gone files."""
    state.apply_rerun(frozenset(job.retry), job.effective_max_tokens)
    limit = (min(scan.rows, job.limit) if job.limit is not None else scan.rows) * job.samples
    unsendable = 0
    if folder is not None:
        gone = resume_marks(out, folder, state.done)
        gone = gone[gone < limit]
        has_row = np.zeros(len(state.done), dtype=bool)
        has_row[state.latest_rows] = True
        unsendable = int((~has_row[gone]).sum())  # gone files that never had a row
    already = int(state.done[:limit].sum()) - unsendable
    return {"limit": limit, "done": state.done, "first_pending": state.first_pending(), "already": already,
            "to_send": limit - unsendable - already,
            "old_max_tokens": {} if {"truncated", "all"} & set(job.retry) else state.old_max_tokens()}


async def open_plan(job: Job, sink: Sink, *, overwrite: bool = False) -> Plan:
    """Open the input and the output for a run (the output's lock held from here on: the caller
    unlocks it), and decide what it sends."""
    out = sink.dir
    if sink.remote is None:  # a remote output's store is checked when its lock is taken (Sink.prepare)
        refuse_foreign_output(out)
    manifest = None if overwrite else sink.read_manifest()
    folder: FolderScan | None = None
    history: dict[str, Any] | None = None
    try:
        source = await asyncio.to_thread(input_path, job)
        fmt = detect_format(source, job.input_format)
        if fmt == "folder":
            check_resume(manifest, job, None, out, shown=sink.location)
            sink.prepare(overwrite=overwrite)  # the index is the output's: lock first
            old = await asyncio.to_thread(read_index, out / INDEX)
            path, scan, folder = await asyncio.to_thread(open_folder, job, source, out / INDEX, old)
            fmt = "jsonl"
            del old  # a line per file: not kept for the run
        else:
            path, fmt, scan = open_input(job, source, fmt, manifest)
            grew = check_resume(manifest, job, scan, out, path, fmt, shown=sink.location)
            sink.prepare(overwrite=overwrite)
            if manifest is None or grew:  # what a later run needs to tell a grown input from a changed one
                history = await asyncio.to_thread(remember, out, path, fmt, scan)
        state = sink.compact(scan.rows * job.samples)
        if folder is not None and mark_gone(sink, folder.entries):
            state = sink.compact(scan.rows)
        decided = await asyncio.to_thread(_decide, job, state, scan, folder, out)
        spent = await asyncio.to_thread(output_spend, out, (manifest or {}).get("spend"))
    except BaseException:
        sink.unlock()
        raise
    return Plan(job, path, fmt, scan, media_settings(job, source, folder=folder is not None), folder, manifest=manifest,
                history=history, spent=spent, **decided)


@contextmanager
def dry_plan(job: Job) -> Iterator[Plan]:
    """The plan a run would make, for ``--dry-run``: nothing is written (a folder's index goes to
    a temporary folder, parts are read, never compacted)."""
    sink = Sink(job.output, job.keep_columns, storage=dict(job.storage)) if job.output else None
    shown = sink.location if sink is not None else None
    if sink is not None and sink.remote is not None:  # read a copy of what the store holds; write nothing there
        sink = Sink(check_output(sink.location), job.keep_columns) if sink.read_manifest() is not None else None
    if sink is not None:
        refuse_foreign_output(sink.dir)
    manifest = sink.read_manifest() if sink is not None and sink.dir.exists() else None
    with tempfile.TemporaryDirectory(prefix="batchkimi-dry-run-") as tmp:
        folder: FolderScan | None = None
        source = input_path(job)
        fmt = detect_format(source, job.input_format)
        if fmt == "folder":
            if sink is not None and manifest:
                check_resume(manifest, job, None, sink.dir, shown=shown)
            old = read_index(sink.dir / INDEX) if sink is not None and manifest else []
            path, scan, folder = open_folder(job, source, Path(tmp) / INDEX, old)
            fmt = "jsonl"
        else:
            path, fmt, scan = open_input(job, source, fmt, manifest)
            if sink is not None and manifest:
                check_resume(manifest, job, scan, sink.dir, path, fmt, shown=shown)
        state = (sink.compact(scan.rows * job.samples, rewrite=False) if sink is not None and manifest
                 else ResumeState(np.zeros(scan.rows * job.samples, dtype=bool)))
        decided = _decide(job, state, scan, folder, sink.dir if sink is not None and manifest else Path(tmp))
        yield Plan(job, path, fmt, scan, media_settings(job, source, folder=folder is not None), folder, manifest=manifest,
                   history=None, spent=(0.0, 0, 0), **decided)
