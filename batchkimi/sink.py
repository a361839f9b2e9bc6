"""The output directory: one writer owns it.

Layout::

    OUTPUT/part-000001.parquet ...   results, readable as one table
    OUTPUT/_manifest.json            the resolved job (no secrets), input fingerprint, counts
    OUTPUT/_journal/seg-000007.jsonl results not yet in a part

Every result is appended to the journal the moment it arrives (a write to the OS, so a
SIGKILL loses nothing; fsync'ed every second for power loss). Every ``rows_per_part`` rows
or ``flush_interval_s`` seconds the segment becomes ``part-<seq>.parquet``: written under a
temporary name, fsync'ed, renamed, and only then is the segment deleted. On opening, a
segment left by a killed run becomes its part (a torn last line is dropped).

Each row carries its input position (``row``); when a row is retried in a later run, the
newer part supersedes the older. :meth:`Sink.compact` rewrites the older parts without
the superseded rows, so the directory holds exactly one row per input row. It runs when a
run opens and when it closes; :func:`read_results` also keeps only the newest row, so a
directory read in the middle of a run is right too.

Files starting with ``_`` or ``.`` are ignored by ``pandas.read_parquet(OUTPUT)`` and by
DuckDB's ``'OUTPUT/*.parquet'``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .errors import OutputError

RESULT_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("row", pa.int64()),
    ("status", pa.string()),
    ("content", pa.string()),
    ("reasoning_content", pa.string()),
    ("tool_calls", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("total_tokens", pa.int64()),
    ("cached_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
    ("model", pa.string()),
    ("attempts", pa.int32()),
    ("latency_s", pa.float64()),
    ("ttft_s", pa.float64()),
    ("http_status", pa.int32()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("request_id", pa.string()),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
]
RESULT_COLUMNS = [name for name, _ in RESULT_FIELDS]
DONE_STATUSES = frozenset({"ok", "invalid"})
MANIFEST = "_manifest.json"
_PART = re.compile(r"^part-(\d{6,})\.parquet$")
_SEG = re.compile(r"^seg-(\d{6,})\.jsonl$")


def kept_column_name(column: str) -> str:
    """Kept input columns keep their name, unless it is a result column's: then ``input_<name>``."""
    return f"input_{column}" if column in RESULT_COLUMNS else column


def result_schema(keep_columns: Iterable[str] = ()) -> pa.Schema:
    fields = [pa.field(n, t) for n, t in RESULT_FIELDS]
    fields += [pa.field(kept_column_name(c), pa.string()) for c in keep_columns]
    return pa.schema(fields)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_table_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class ResumeState:
    """What earlier runs left: which input positions are finished, and prior counts."""

    done: np.ndarray  # bool per input position
    prior_status: dict[str, int] = field(default_factory=dict)

    def first_pending(self) -> int:
        pending = np.flatnonzero(~self.done)
        return int(pending[0]) if pending.size else len(self.done)


class Sink:
    def __init__(self, out_dir: Path, keep_columns: Iterable[str] = (), rows_per_part: int = 10000,
                 bytes_per_part: int = 32 << 20) -> None:
        self.dir = Path(out_dir)
        self.journal_dir = self.dir / "_journal"
        self.keep_columns = tuple(keep_columns)
        self.schema = result_schema(self.keep_columns)
        self.rows_per_part = rows_per_part
        # Long thinking answers make rows large: a part is bounded in bytes too, so turning a
        # segment into a part needs the same memory whatever the rows hold.
        self.bytes_per_part = bytes_per_part
        self._seg_bytes = 0
        self._seq = 0
        self._seg_fh: Any = None
        self._seg_rows = 0
        self._last_fsync = 0.0
        self._dirty = False
        self._lock_fh: Any = None
        self.latest: tuple[np.ndarray, np.ndarray, list[str]] = (np.zeros(0, np.int64), np.zeros(0, np.int64), [])

    # ---- manifest ----------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        path = self.dir / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(f"{path} is unreadable ({exc}); move the output away or use --overwrite") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        path = self.dir / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        try:
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            raise self._os_error(exc, "write the manifest") from exc

    # ---- opening -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the directory, take the writer's lock, and turn a killed run's journal into parts."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.journal_dir.mkdir(exist_ok=True)
            probe = self.dir / ".write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise self._os_error(exc, "create the output directory") from exc
        self._lock()
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        parts = {int(m.group(1)) for p in self.dir.iterdir() if (m := _PART.match(p.name))}
        for seg in sorted(self.journal_dir.iterdir()):
            m = _SEG.match(seg.name)
            if not m:
                continue
            seq = int(m.group(1))
            if seq not in parts:
                self._segment_to_part(seg, seq)
                parts.add(seq)
            seg.unlink()
        self._seq = max(parts, default=0)

    def _lock(self) -> None:
        """One writer per output: a second run on the same directory is refused, not interleaved.
        The OS drops the lock when the process ends, however it ends."""
        fh = open(self.dir / ".lock", "a+")
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
        fh, self._lock_fh = self._lock_fh, None
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def part_paths(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if _PART.match(p.name))

    def compact(self, total_rows: int | None = None, *, rewrite: bool = True) -> ResumeState:
        """Drop rows superseded by a newer part (unless ``rewrite`` is False: a read-only look);
        return which positions are finished."""
        parts = self.part_paths() if self.dir.is_dir() else []
        tables = []
        for path in parts:
            seq = int(_PART.match(path.name).group(1))  # type: ignore[union-attr]
            t = pq.read_table(path, columns=["row", "status"])
            tables.append(t.append_column("seq", pa.array(np.full(t.num_rows, seq, dtype=np.int64))))
        size = total_rows or 0
        if not tables:
            return ResumeState(np.zeros(size, dtype=bool))
        allrows = pa.concat_tables(tables)
        rows = allrows.column("row").to_numpy()
        seqs = allrows.column("seq").to_numpy()
        # status as small integer codes: no Python object per row
        status_dict = pc.dictionary_encode(allrows.column("status")).combine_chunks()
        codes = status_dict.indices.to_numpy(zero_copy_only=False)
        names = status_dict.dictionary.to_pylist()
        del allrows, tables
        # newest first per row: sort by (row, -seq) and keep the first of each row
        order = np.lexsort((-seqs, rows))
        rows_s, seqs_s = rows[order], seqs[order]
        first = np.ones(len(rows_s), dtype=bool)
        first[1:] = rows_s[1:] != rows_s[:-1]
        stale_parts = set(np.unique(seqs_s[~first]).tolist())
        if rewrite and stale_parts:
            keep_rows, keep_seqs = rows_s[first], seqs_s[first]
            for path in parts:
                seq = int(_PART.match(path.name).group(1))  # type: ignore[union-attr]
                if seq not in stale_parts:
                    continue
                table = pq.read_table(path)
                part_rows = table.column("row").to_numpy()
                idx = np.searchsorted(keep_rows, part_rows)
                mask = keep_seqs[np.minimum(idx, len(keep_seqs) - 1)] == seq
                try:
                    if mask.any():
                        write_table_atomic(table.filter(pa.array(mask)), path)
                    else:
                        path.unlink()
                except OSError as exc:
                    raise self._os_error(exc, f"compact {path.name}") from exc
        latest_rows = rows_s[first]
        latest_codes = codes[order][first]
        size = max(size, int(latest_rows.max()) + 1 if latest_rows.size else 0)
        done = np.zeros(size, dtype=bool)
        done_codes = [i for i, n in enumerate(names) if n in DONE_STATUSES]
        done[latest_rows[np.isin(latest_codes, done_codes)]] = True
        counts = {names[i]: int(n) for i, n in enumerate(np.bincount(latest_codes, minlength=len(names))) if n}
        self.latest = (latest_rows, latest_codes, names)
        return ResumeState(done, counts)

    def positions_with_status(self, statuses: Iterable[str], below: int | None = None) -> np.ndarray:
        """Input positions whose latest row has one of ``statuses`` (after :meth:`compact`)."""
        rows, codes, names = self.latest
        wanted = [i for i, n in enumerate(names) if n in set(statuses)]
        picked = rows[np.isin(codes, wanted)]
        return picked[picked < below] if below is not None else picked

    def status_counts(self, below: int | None = None) -> dict[str, int]:
        """Counts of the latest status of each row (after :meth:`compact`), rows < ``below`` only if given."""
        rows, codes, names = self.latest
        if below is not None:
            codes = codes[rows < below]
        return {names[i]: int(n) for i, n in enumerate(np.bincount(codes, minlength=len(names))) if n}

    # ---- writing -----------------------------------------------------------------------
    def _open_segment(self) -> None:
        self._seq += 1
        path = self.journal_dir / f"seg-{self._seq:06d}.jsonl"
        try:
            self._seg_fh = open(path, "ab", buffering=0)
        except OSError as exc:
            raise self._os_error(exc, "open the journal") from exc
        self._seg_rows = 0
        self._seg_bytes = 0

    def append(self, rows: list[dict[str, Any]]) -> bool:
        """Journal ``rows`` (one write); True when the segment is full and should become a part."""
        if not rows:
            return False
        if self._seg_fh is None:
            self._open_segment()
        data = b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in rows)
        try:
            self._seg_fh.write(data)
        except OSError as exc:
            raise self._os_error(exc, "write results to the journal") from exc
        self._seg_rows += len(rows)
        self._seg_bytes += len(data)
        self._dirty = True
        return self._seg_rows >= self.rows_per_part or self._seg_bytes >= self.bytes_per_part

    def sync(self) -> None:
        """fsync the journal (for power loss; a SIGKILL already loses nothing)."""
        if self._seg_fh is not None and self._dirty:
            try:
                os.fsync(self._seg_fh.fileno())
            except OSError as exc:
                raise self._os_error(exc, "sync the journal") from exc
            self._dirty = False
            self._last_fsync = time.monotonic()

    def roll(self) -> None:
        """Turn the current segment into a part (call from a worker thread: it does I/O and CPU)."""
        if self._seg_fh is None:
            return
        fh, seq = self._seg_fh, self._seq
        self._seg_fh = None
        fh.close()
        seg = self.journal_dir / f"seg-{seq:06d}.jsonl"
        if self._seg_rows:
            self._segment_to_part(seg, seq)
        seg.unlink(missing_ok=True)
        self._seg_rows = 0
        self._seg_bytes = 0
        pa.default_memory_pool().release_unused()  # give conversion buffers back to the OS

    def close(self) -> None:
        self.roll()

    def _segment_to_part(self, seg: Path, seq: int) -> None:
        try:
            table = self._read_segment_fast(seg)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            table = self._read_segment_slow(seg)  # a line torn by a crash, or an odd value
        if table is None or table.num_rows == 0:
            return
        try:
            write_table_atomic(table, self.dir / f"part-{seq:06d}.parquet")
        except OSError as exc:
            raise self._os_error(exc, f"write part-{seq:06d}.parquet") from exc

    def _read_segment_fast(self, seg: Path) -> pa.Table | None:
        # pyarrow's C++ JSON reader: much faster than Python, and it releases the GIL.
        if seg.stat().st_size == 0:
            return None
        journal_schema = pa.schema([pa.field(f.name, pa.int64()) if f.name == "finished_at" else f for f in self.schema])
        opts = pajson.ParseOptions(explicit_schema=journal_schema, unexpected_field_behavior="ignore")
        table = pajson.read_json(seg, parse_options=opts, read_options=pajson.ReadOptions(use_threads=False, block_size=16 << 20))
        return self._conform(table)

    def _read_segment_slow(self, seg: Path) -> pa.Table | None:
        rows = []
        with open(seg, "rb") as fh:
            for line in fh:
                try:
                    rows.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue  # a line torn by a crash: that row is simply sent again
        return self.rows_to_table(rows) if rows else None

    def _conform(self, table: pa.Table) -> pa.Table:
        columns = []
        for f in self.schema:
            if f.name in table.column_names:
                col = table.column(f.name)
                columns.append(col if col.type == f.type else col.cast(f.type))
            else:
                columns.append(pa.nulls(table.num_rows, f.type))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def rows_to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        """Result rows (``finished_at`` in epoch milliseconds) as a table of the fixed schema."""
        columns = []
        for f in self.schema:
            values = [r.get(f.name) for r in rows]
            columns.append(pa.array(values, type=pa.int64() if f.name == "finished_at" else f.type))
        return self._conform(pa.Table.from_arrays(columns, names=self.schema.names))

    def _os_error(self, exc: OSError, doing: str) -> OutputError:
        if exc.errno == errno.ENOSPC:
            why = "the disk is full"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "it is not writable"
        else:
            why = exc.strerror or str(exc)
        return OutputError(
            f"cannot {doing} in {self.dir}: {why}. Results already written stay valid; "
            "fix this and run the same command to resume."
        )


def read_results(output: str | os.PathLike[str], *, columns: list[str] | None = None) -> Any:
    """The results of a run as a pandas DataFrame: one row per input row, the newest attempt,
    ordered by input position. Correct even while the run is still writing."""
    import pandas as pd

    path = Path(output)
    parts = sorted(p for p in path.glob("part-*.parquet") if _PART.match(p.name)) if path.is_dir() else []
    if not parts:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in (columns or RESULT_COLUMNS)})
    frames = []
    for p in parts:
        df = pq.read_table(p, columns=None if columns is None else sorted(set(columns) | {"row"})).to_pandas()
        df["_seq"] = int(_PART.match(p.name).group(1))  # type: ignore[union-attr]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["row", "_seq"]).drop_duplicates("row", keep="last").drop(columns="_seq")
    df = df.reset_index(drop=True)
    return df[columns] if columns is not None else df
