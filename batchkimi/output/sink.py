"""The output directory, behind one small facade: one writer owns it.

Layout::

    OUTPUT/part-000001.parquet ...   results, readable as one table (:mod:`.parts`)
    OUTPUT/_manifest.json            the resolved job (no secrets), input fingerprint, counts
    OUTPUT/_journal/seg-000007.jsonl results not yet in a part (:mod:`.journal`)
    OUTPUT/.lock                     held by the one run writing here

Every batch of results is appended to the journal the moment it arrives. Every
``rows_per_part`` rows (or ``bytes_per_part`` bytes, or ``flush_interval_s`` seconds) the
segment becomes ``part-<seq>.parquet`` and only then is the segment deleted. On opening, a
segment left by a killed run becomes its part (a torn last line is dropped), and parts written
with other kept columns are rewritten to this run's schema.

Files starting with ``_`` or ``.`` are ignored by ``pandas.read_parquet(OUTPUT)`` and by
DuckDB's ``'OUTPUT/*.parquet'``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from ..files import empty_folder
from ..storage.location import is_url
from ..storage.lock import ObjectLock, open_remote
from ..storage.remote import RemoteFolder, copy_dir
from . import parts
from .journal import Journal, encode_rows, write_all
from .parts import ResumeState
from .results import RESULT_COLUMNS, kept_column_name, result_schema

SCORES = "_scores.parquet"  # written by batchkimi.scoring.score

__all__ = ["MANIFEST", "RESULT_COLUMNS", "ResumeState", "Sink", "check_output", "is_output", "kept_column_name", "read_results"]

MANIFEST = "_manifest.json"
LOCK = ".lock"


class Sink:
    """``out_dir``: a local folder, or the URL of one on object storage, worked on in a local
    copy (:mod:`batchkimi.storage.remote`) whose parts, manifest and scores are pushed as
    whole objects the moment they are written; the journal stays in the local copy."""

    def __init__(self, out_dir: Path | str, keep_columns: Iterable[str] = (), rows_per_part: int = 10000,
                 bytes_per_part: int = 2 << 20, storage: dict[str, Any] | None = None) -> None:
        self.url = str(out_dir) if is_url(str(out_dir)) else None
        self.remote: RemoteFolder | None = None
        self._object_lock: ObjectLock | None = None
        if self.url is not None:
            self.remote = RemoteFolder(self.url, copy_dir(self.url, "output"), storage)
            self.dir = self.remote.local
        else:
            self.dir = Path(out_dir)
        self.keep_columns = tuple(keep_columns)
        self.schema = result_schema(self.keep_columns)
        self.rows_per_part = rows_per_part
        # Long thinking answers make rows large: a part is bounded in bytes too, so turning a
        # segment into a part needs the same memory whatever the rows hold.
        self.bytes_per_part = bytes_per_part
        self.journal = Journal(self.dir / "_journal")
        self.state = ResumeState(np.zeros(0, dtype=bool))
        self._seq = 0
        self._lock_fh: Any = None

    # ---- manifest ----------------------------------------------------------------------
    @property
    def location(self) -> str:
        """Where the output is, as the user named it (a URL, or the local folder)."""
        return self.url or str(self.dir)

    def publish(self) -> None:
        """Push what changed in a remote output's local copy (nothing for a local output)."""
        if self.remote is None:
            return
        if self._object_lock is not None and self._object_lock.lost:
            raise OutputError(f"another run took over the lock of {self.location}: this run stops writing there")
        self.remote.push()

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.dir / MANIFEST
        try:
            if self.remote is not None and self._object_lock is None:  # not opened yet: the store's, not the copy's
                data = self.remote.read(MANIFEST)
                return None if data is None else json.loads(data)
            return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        except (OSError, ValueError) as exc:
            raise OutputError(f"{self.location}/{MANIFEST} is unreadable ({exc}); move the output away or use "
                              "--overwrite") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        path = self.dir / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            raise self._os_error(exc, "write the manifest") from exc
        self.publish()

    # ---- opening -----------------------------------------------------------------------
    def prepare(self, *, overwrite: bool = False) -> None:
        """Create the directory and take the writer's lock; then, under the lock, empty it
        (``overwrite``) or turn a killed run's journal into parts and give every part this
        run's schema."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._os_error(exc, "create the output directory") from exc
        self._lock()
        try:
            if self.remote is not None:
                self._object_lock = open_remote(self.remote, overwrite=overwrite, ours=is_output_listing)
            if overwrite:
                self._empty()
            self.journal.dir.mkdir(exist_ok=True)
            probe = self.dir / ".write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
            for stale in self.dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
            seqs = {parts.part_seq(p) for p in parts.part_paths(self.dir)}
            for seq, seg in self.journal.left_over():
                if seq not in seqs:
                    self._segment_to_part(seg, seq)
                    seqs.add(seq)
                seg.unlink()
            parts.conform(self.dir, self.schema)
            self._seq = max(seqs, default=0)
            self.publish()
        except OSError as exc:
            self.unlock()
            raise self._os_error(exc, "open the output") from exc
        except BaseException:
            self.unlock()
            raise

    def _empty(self) -> None:
        """``--overwrite``: delete everything but the lock we hold."""
        empty_folder(self.dir, LOCK)

    def _lock(self) -> None:
        """One writer per output: a second run on the same directory is refused, not interleaved.
        The OS drops the lock when the process ends, however it ends."""
        try:
            fh = open(self.dir / LOCK, "a+")
        except OSError as exc:
            raise self._os_error(exc, "create the lock file") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise OutputError(f"{self.dir} is being written by another batchkimi run ({holder}); wait for it or use another --output") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh = fh

    def unlock(self) -> None:
        lock, self._object_lock = self._object_lock, None
        if lock is not None:
            lock.release()
        fh, self._lock_fh = self._lock_fh, None
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def compact(self, total_rows: int | None = None, *, rewrite: bool = True) -> ResumeState:
        """Drop rows superseded by a newer part (unless ``rewrite`` is False: a read-only look);
        return which positions are finished."""
        try:
            self.state = parts.compact(self.dir, total_rows, rewrite=rewrite)
        except OSError as exc:
            raise self._os_error(exc, "compact the parts") from exc
        if rewrite:
            self.publish()
        return self.state

    def positions_with_status(self, statuses: Iterable[str], below: int | None = None) -> np.ndarray:
        """Input positions whose latest row has one of ``statuses`` (after :meth:`compact`)."""
        return self.state.positions_with_status(frozenset(statuses), below)

    def status_counts(self, below: int | None = None) -> dict[str, int]:
        """Counts of the latest status of each row (after :meth:`compact`), rows < ``below`` only if given."""
        return self.state.status_counts(below)

    # ---- writing -----------------------------------------------------------------------
    def append(self, rows: list[dict[str, Any]]) -> bool:
        """Journal ``rows`` (one write); True when the segment is full and should become a part."""
        if not rows:
            return False
        data = encode_rows(rows)
        try:
            if not self.journal.is_open:
                self._seq += 1
                self.journal.open(self._seq)
            self.journal.append(data, len(rows))
        except OSError as exc:
            raise self._os_error(exc, "write results to the journal") from exc
        return self.journal.rows >= self.rows_per_part or self.journal.bytes >= self.bytes_per_part

    @property
    def last_part(self) -> int:
        """The sequence number of the newest part written or begun (0: none)."""
        return self._seq

    @property
    def unsynced(self) -> bool:
        return self.journal.dirty

    def sync(self) -> None:
        """fsync the journal (for power loss; a SIGKILL already loses nothing written)."""
        try:
            self.journal.sync()
        except OSError as exc:
            raise self._os_error(exc, "sync the journal") from exc

    def roll(self) -> None:
        """Turn the current segment into a part (call from a worker thread: it does I/O and CPU)."""
        rows, seq = self.journal.rows, self.journal.seq
        try:
            seg = self.journal.close()
        except OSError as exc:
            raise self._os_error(exc, "sync the journal") from exc
        if seg is None:
            return
        if rows:
            self._segment_to_part(seg, seq)
            self.publish()  # the part is on the store before its journal segment goes
        seg.unlink(missing_ok=True)
        pa.default_memory_pool().release_unused()  # give conversion buffers back to the OS

    def close(self) -> None:
        self.roll()

    def write_part(self, table: pa.Table) -> None:
        """A part of rows made outside the journal (rows rewritten before a run starts): it is
        newer than every part so far, so it supersedes their copies of those rows."""
        self._seq += 1
        path = parts.part_path(self.dir, self._seq)
        try:
            parts.write_table_atomic(parts.conform_table(table, self.schema), path)
        except OSError as exc:
            raise self._os_error(exc, f"write {path.name}") from exc
        self.publish()

    def _segment_to_part(self, seg: Path, seq: int) -> None:
        table = parts.segment_to_table(seg, self.schema)
        if table is None or table.num_rows == 0:
            return
        path = parts.part_path(self.dir, seq)
        try:
            parts.write_table_atomic(table, path)
        except OSError as exc:
            raise self._os_error(exc, f"write {path.name}") from exc

    def _os_error(self, exc: OSError, doing: str) -> OutputError:
        if exc.errno == errno.ENOSPC:
            why = "the disk is full"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "it is not writable"
        else:
            why = exc.strerror or str(exc)
        return OutputError(
            f"cannot {doing} in {self.location}: {why}. Results already written stay valid; "
            "fix this and run the same command to resume."
        )


def is_output_listing(names: Iterable[str]) -> bool:
    """Whether a folder's object names are a batchkimi output's (a manifest, or parts)."""
    return any(n == MANIFEST or parts.PART.match(n) for n in names)


def is_output(path: Path) -> bool:
    """Whether ``path`` is a batchkimi output: it holds a manifest, or parts or a journal a run wrote."""
    return (path / MANIFEST).is_file() or bool(parts.part_paths(path)) or (path / "_journal").is_dir()


def check_output(output: str | os.PathLike[str]) -> Path:
    """``output`` as a Path, or an OutputError saying why it is no batchkimi output. A URL's
    objects are fetched into a local copy first (only those that changed since the last look);
    rows still in a remote writer's journal appear when it pushes its next part."""
    if is_url(str(output)):
        remote = RemoteFolder(str(output), copy_dir(str(output), "read"))
        remote.pull()
        if not is_output(remote.local):
            raise OutputError(f"{remote.url} is not a batchkimi output (it holds no {MANIFEST} and no part-*.parquet): "
                              "give the output folder of a batchkimi run")
        return remote.local
    path = Path(output)
    if not path.is_dir():
        raise OutputError(f"{path} is not a folder: give the output folder of a batchkimi run")
    if not is_output(path):
        raise OutputError(f"{path} is not a batchkimi output (it holds no {MANIFEST}, no part-*.parquet "
                          "written by a run and no _journal): give the output folder of a batchkimi run")
    return path


def read_results(output: str | os.PathLike[str], *, columns: list[str] | None = None, scores: bool = True) -> Any:
    """The results of a run as a pandas DataFrame: one row per input row, the newest attempt,
    ordered by input position, with its scores (``_scores.parquet``, see :mod:`.scoring`)
    joined when ``scores`` and they were computed for this very attempt. Correct even while the
    run is still writing, and after it was killed: rows still in its journal are read too.
    Raises OutputError for a folder that is not a batchkimi output."""
    import pandas as pd

    path = check_output(output)
    found = parts.part_paths(path)
    journaled = parts.journal_tables(path)
    if not found and not journaled:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in (columns or RESULT_COLUMNS)})
    scored = path / SCORES
    score_table = pq.read_table(scored) if scores and scored.exists() else None
    score_cols = [c for c in score_table.column_names if c not in ("row", "id", "finished_at")] if score_table is not None else []
    base = None if columns is None else sorted((set(columns) - set(score_cols)) | {"row", "finished_at"})
    frames = []
    for p in found:
        have = pq.read_schema(p).names
        df = pq.read_table(p, columns=None if base is None else [c for c in base if c in have]).to_pandas()
        df["_seq"] = parts.part_seq(p)
        frames.append(df)
    for seq, t in journaled:
        df = t.select([c for c in t.column_names if base is None or c in base]).to_pandas()
        df["_seq"] = seq
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["row", "_seq"]).drop_duplicates("row", keep="last").drop(columns="_seq")
    if score_table is not None and (columns is None or set(columns) & set(score_cols)):
        # a score made for an older attempt of the row is not this attempt's: matched on the time too
        s = score_table.drop_columns(["id"]).to_pandas()
        df = df.merge(s, on=["row", "finished_at"], how="left")
    df = df.reset_index(drop=True)
    return df[[c for c in columns if c in df.columns]] if columns is not None else df
