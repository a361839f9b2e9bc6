"""The Parquet parts: ``OUTPUT/part-<seq>.parquet``, each written atomically (temporary name,
fsync, rename), and what they say about which input rows are done.

Each row carries its input position (``row``); when a row is retried in a later run the newer
part supersedes the older, and :func:`compact` rewrites the older parts without the superseded
rows, so the directory holds exactly one row per input row. :func:`conform` rewrites parts
written with other kept columns to the current schema (older rows null in a new column), so
the whole output has one schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from ..files import fsync_dir
from ..policy.rerun import KINDS, kinds_of, resend_mask
from .results import rows_to_table

PART = re.compile(r"^part-(\d{6,})\.parquet$")


def part_path(directory: Path, seq: int) -> Path:
    return directory / f"part-{seq:06d}.parquet"


def part_seq(path: Path) -> int:
    m = PART.match(path.name)
    assert m, path
    return int(m.group(1))


def part_paths(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if PART.match(p.name)) if directory.is_dir() else []


def write_table_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def segment_to_table(seg: Path, schema: pa.Schema) -> pa.Table | None:
    """A journal segment as a table of ``schema``; a line torn by a crash is dropped."""
    if seg.stat().st_size == 0:
        return None
    try:
        # pyarrow's C++ JSON reader: much faster than Python, and it releases the GIL.
        journal_schema = pa.schema([pa.field(f.name, pa.int64()) if f.name == "finished_at" else f for f in schema])
        opts = pajson.ParseOptions(explicit_schema=journal_schema, unexpected_field_behavior="ignore")
        table = pajson.read_json(seg, parse_options=opts, read_options=pajson.ReadOptions(use_threads=False, block_size=16 << 20))
        return conform_table(table, schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass  # a torn last line, or a value of another type: the careful path below
    rows = []
    with open(seg, "rb") as fh:
        for line in fh:
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line torn by a crash: that row is simply sent again
            if isinstance(value, dict) and isinstance(value.get("row"), int):
                rows.append(value)
    return rows_to_table(rows, schema) if rows else None


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones null, extra ones dropped."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            columns.append(col if col.type == f.type else col.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def conform(directory: Path, schema: pa.Schema) -> int:
    """Rewrite every part whose schema is not ``schema``; the number rewritten."""
    rewritten = 0
    for path in part_paths(directory):
        if pq.read_schema(path).remove_metadata() == schema:
            continue
        write_table_atomic(conform_table(pq.read_table(path), schema), path)
        rewritten += 1
    return rewritten


@dataclass
class ResumeState:
    """What earlier runs left: which input positions are finished, and the latest status of each
    row with what a rerun needs to know of it (:mod:`batchkimi.policy.rerun`)."""

    done: np.ndarray  # bool per input position, by the default rerun rules
    latest_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    latest_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    names: list[str] = field(default_factory=list)
    latest_kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # rerun.KINDS codes
    latest_max_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # -1: not recorded

    def apply_rerun(self, retry: frozenset[str], max_tokens: int | None) -> np.ndarray:
        """Mark done, in place, every position a rerun with ``retry`` and ``max_tokens`` does not
        send again (see :func:`batchkimi.policy.rerun.resend_mask`); returns ``done``."""
        self.done[:] = False
        final = ~resend_mask(self.latest_kinds, self.latest_max_tokens, retry, max_tokens)
        self.done[self.latest_rows[final]] = True
        return self.done

    def old_max_tokens(self) -> dict[int, int]:
        """Truncated rows' recorded max_tokens, by position (a rerun sends them only with more)."""
        pick = (self.latest_kinds == KINDS.index("truncated")) & (self.latest_max_tokens >= 0)
        return dict(zip(self.latest_rows[pick].tolist(), self.latest_max_tokens[pick].tolist(), strict=True))

    def first_pending(self) -> int:
        pending = np.flatnonzero(~self.done)
        return int(pending[0]) if pending.size else len(self.done)

    def positions_with_status(self, statuses: set[str] | frozenset[str], below: int | None = None) -> np.ndarray:
        wanted = [i for i, n in enumerate(self.names) if n in statuses]
        picked = self.latest_rows[np.isin(self.latest_codes, wanted)]
        return picked[picked < below] if below is not None else picked

    def status_counts(self, below: int | None = None) -> dict[str, int]:
        codes = self.latest_codes if below is None else self.latest_codes[self.latest_rows < below]
        return {self.names[i]: int(n) for i, n in enumerate(np.bincount(codes, minlength=len(self.names))) if n}


def compact(directory: Path, total_rows: int | None = None, *, rewrite: bool = True) -> ResumeState:
    """Drop rows superseded by a newer part (unless ``rewrite`` is False: a read-only look);
    return which positions are finished. Reads only the ``row`` and ``status`` columns."""
    parts = part_paths(directory)
    wanted = ("row", "status", "http_status", "error_type", "max_tokens")
    kinds_of_columns = {"http_status": pa.int32(), "error_type": pa.string(), "max_tokens": pa.int64()}

    def read(path: Path) -> pa.Table:
        have = set(pq.read_schema(path).names)
        t = pq.read_table(path, columns=[c for c in wanted if c in have])
        for name, kind in kinds_of_columns.items():  # a part written by an older version
            if name not in have:
                t = t.append_column(name, pa.nulls(t.num_rows, kind))
        t = t.select(list(wanted))
        return t.append_column("seq", pa.array(np.full(t.num_rows, part_seq(path), dtype=np.int64)))

    # Many small parts: pyarrow reads them without the GIL, so a few threads shorten a resume's start.
    with ThreadPoolExecutor(max_workers=min(8, len(parts) or 1)) as pool:
        tables = list(pool.map(read, parts))
    size = total_rows or 0
    if not tables:
        return ResumeState(np.zeros(size, dtype=bool))
    allrows = pa.concat_tables(tables)
    rows = allrows.column("row").to_numpy()
    seqs = allrows.column("seq").to_numpy()
    # status as small integer codes: no Python object per row
    status_dict = pc.dictionary_encode(allrows.column("status")).combine_chunks()
    codes = status_dict.indices.to_numpy(zero_copy_only=False)
    names = [str(n) for n in status_dict.dictionary.to_pylist()]
    del tables
    # newest first per row: sort by (row, -seq) and keep the first of each row
    order = np.lexsort((-seqs, rows))
    rows_s, seqs_s = rows[order], seqs[order]
    first = np.ones(len(rows_s), dtype=bool)
    first[1:] = rows_s[1:] != rows_s[:-1]
    stale_parts = set(np.unique(seqs_s[~first]).tolist())
    if rewrite and stale_parts:
        keep_rows, keep_seqs = rows_s[first], seqs_s[first]
        for path in parts:
            seq = part_seq(path)
            if seq not in stale_parts:
                continue
            table = pq.read_table(path)
            part_rows = table.column("row").to_numpy()
            idx = np.searchsorted(keep_rows, part_rows)
            mask = keep_seqs[np.minimum(idx, len(keep_seqs) - 1)] == seq
            if mask.any():
                write_table_atomic(table.filter(pa.array(mask)), path)
            else:
                path.unlink()
    latest = order[first]
    latest_rows = rows_s[first]
    latest_codes = codes[latest]
    kinds = kinds_of(np.asarray(names, dtype=object)[latest_codes] if names else np.zeros(0, dtype=object),
                     allrows.column("http_status").take(pa.array(latest)),
                     allrows.column("error_type").take(pa.array(latest)))
    max_tokens = allrows.column("max_tokens").take(pa.array(latest)).fill_null(-1).to_numpy(zero_copy_only=False)
    del allrows
    size = max(size, int(latest_rows.max()) + 1 if latest_rows.size else 0)
    state = ResumeState(np.zeros(size, dtype=bool), latest_rows, latest_codes, names, kinds, max_tokens.astype(np.int64))
    state.apply_rerun(frozenset(), None)
    return state


def newest_seq(paths: list[Path]) -> np.ndarray:
    """For each row position, the sequence number of the part holding its newest copy (-1: none)."""
    rows = [pq.read_table(p, columns=["row"]).column("row").to_numpy() for p in paths]
    if not rows or not sum(len(r) for r in rows):
        return np.zeros(0, dtype=np.int64)
    r = np.concatenate(rows)
    s = np.concatenate([np.full(len(x), part_seq(p), dtype=np.int64) for x, p in zip(rows, paths, strict=True)])
    newest = np.full(int(r.max()) + 1, -1, dtype=np.int64)
    np.maximum.at(newest, r, s)
    return newest


def journal_segments(directory: Path) -> list[tuple[int, Path]]:
    """Journal segments a run left (killed, or still writing) whose rows are in no part yet
    (a segment whose part exists was being deleted when the run died), oldest first."""
    from .journal import Journal

    jdir = directory / "_journal"
    if not jdir.is_dir():
        return []
    done = {part_seq(p) for p in part_paths(directory)}
    return [(seq, p) for seq, p in Journal(jdir).left_over() if seq not in done]


def journal_schema(directory: Path, segments: list[tuple[int, Path]]) -> pa.Schema:
    """The schema journal rows are read with: the newest part's, else the result columns and
    the kept columns the first journaled row holds."""
    from .results import RESULT_COLUMNS, result_schema

    paths = part_paths(directory)
    if paths:
        return pq.read_schema(paths[-1])
    for _, seg in segments:
        with open(seg, "rb") as fh:
            for line in fh:
                try:
                    first = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(first, dict):
                    return result_schema([k for k in first if k not in RESULT_COLUMNS and not k.startswith("input_")])
    return result_schema()


def journal_tables(directory: Path) -> list[tuple[int, pa.Table]]:
    """(sequence, rows) of every journal segment not yet in a part."""
    segments = journal_segments(directory)
    if not segments:
        return []
    schema = journal_schema(directory, segments)
    out = []
    for seq, seg in segments:
        t = segment_to_table(seg, schema)
        if t is not None and t.num_rows:
            out.append((seq, t))
    return out


def iter_newest(directory: Path, columns: list[str], *, journal: bool = False) -> Iterator[pa.Table]:
    """Each part's rows that are the newest copy of their row (a row retried later is read from
    its newest part only, compacted or not), a part at a time: flat memory. A column a part
    lacks (written by an older version) comes as nulls. ``journal``: rows a killed (or still
    running) run left in its journal too, after the parts (for readers; the writer turns the
    journal into parts first)."""
    paths = part_paths(directory)
    newest = newest_seq(paths)
    segments = journal_tables(directory) if journal else []
    if segments:
        top = max(int(t.column("row").to_numpy().max()) for _, t in segments if t.num_rows) + 1
        if top > len(newest):
            newest = np.concatenate([newest, np.full(top - len(newest), -1, dtype=np.int64)])
        for seq, t in segments:
            r = t.column("row").to_numpy()
            np.maximum.at(newest, r, seq)
    sources: list[tuple[int, Any]] = [(part_seq(p), p) for p in paths] + segments
    for seq, src in sources:
        if isinstance(src, Path):
            have = set(pq.read_schema(src).names)
            t = pq.read_table(src, columns=[c for c in columns if c in have])
        else:
            have = set(src.column_names)
            t = src.select([c for c in columns if c in have])
        for c in columns:
            if c not in have:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
        keep = newest[t.column("row").to_numpy()] == seq
        yield t if keep.all() else t.filter(pa.array(keep))
