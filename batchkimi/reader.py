"""Read a dataset in bounded batches: JSONL (optionally .gz), Parquet (a file or a folder of
files), or an OpenAI Batch API request file. Never the whole file in memory.

Each row is a :class:`SourceRow` with its 0-based position among the data rows (blank lines
are not rows). A line that is not valid JSON is still a row, carrying its error, so that it
becomes an ``invalid`` output row instead of ending the job.

:func:`scan_input` makes one pass before anything is sent: it counts rows, fingerprints
the file's bytes, and finds duplicate ids.
"""

from __future__ import annotations

import array
import gzip
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq

from .errors import DatasetError

BATCH_ROWS = 1024


@dataclass(slots=True)
class SourceRow:
    pos: int  # 0-based position among data rows: the row's key for resuming
    where: str  # "line 18 of data.jsonl" / "row 17 of data.parquet": for error messages
    data: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class InputScan:
    rows: int
    fingerprint: str
    has_id_column: bool
    size_bytes: int
    mtime_ns: int


def detect_format(path: Path, declared: str = "auto") -> str:
    """``jsonl``, ``parquet`` or ``openai_batch``."""
    if declared != "auto":
        return declared
    if path.is_dir():
        return "parquet"
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz")):
        for row in _iter_jsonl(path, stop_after=1):
            if row.data is not None and "custom_id" in row.data and isinstance(row.data.get("body"), dict):
                return "openai_batch"
            break
        return "jsonl"
    raise DatasetError(f"cannot tell the format of {path}: name it .jsonl, .jsonl.gz or .parquet, or set input_format")


def _open_bytes(path: Path) -> io.BufferedIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
        if not files:
            raise DatasetError(f"the folder {path} holds no .parquet files")
        return files
    return [path]


def _iter_jsonl(path: Path, stop_after: int | None = None, skip_until: int = 0) -> Iterator[SourceRow]:
    pos = 0
    name = path.name
    with _open_bytes(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if pos < skip_until:
                pos += 1
                continue
            where = f"line {lineno} of {name}"
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield SourceRow(pos, where, None, f"{where} is not valid JSON ({exc.args[0] if exc.args else exc})")
            else:
                if isinstance(value, dict):
                    yield SourceRow(pos, where, value)
                else:
                    yield SourceRow(pos, where, None, f"{where} is a JSON {type(value).__name__}, not an object")
            pos += 1
            if stop_after is not None and pos >= stop_after:
                return


def _iter_parquet(path: Path, skip_until: int = 0) -> Iterator[SourceRow]:
    pos = 0
    for file in _parquet_files(path):
        try:
            pf = pq.ParquetFile(file)
        except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses
            raise DatasetError(f"cannot read {file} as Parquet: {exc}") from exc
        n = pf.metadata.num_rows
        if pos + n <= skip_until:
            pos += n
            continue
        first = pos  # rows are numbered within each file in messages, from 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            if pos + batch.num_rows <= skip_until:
                pos += batch.num_rows
                continue
            for record in batch.to_pylist():
                if pos >= skip_until:
                    yield SourceRow(pos, f"row {pos - first} of {file.name}", record)
                pos += 1


def read_rows(path: Path, fmt: str, skip_until: int = 0) -> Iterator[list[SourceRow]]:
    """Rows in batches of at most ``BATCH_ROWS``, from position ``skip_until`` on."""
    if not path.exists():
        raise DatasetError(f"the input {path} does not exist")
    rows: Iterator[SourceRow]
    if fmt == "parquet":
        rows = _iter_parquet(path, skip_until)
    else:
        rows = _iter_jsonl(path, skip_until=skip_until)
    batch: list[SourceRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def row_id(row: SourceRow, fmt: str, id_column: str, has_id_column: bool) -> str | None:
    """The row's id as text; a stable ``row-<pos>`` when the dataset has no id column."""
    if fmt == "openai_batch":
        value = row.data.get("custom_id") if row.data else None
    elif has_id_column:
        value = row.data.get(id_column) if row.data else None
    else:
        return f"row-{row.pos}"
    if value is None or isinstance(value, dict | list) or value == "":
        return None
    return str(value)


def scan_input(path: Path, fmt: str, id_column: str) -> InputScan:
    """One pass: count, fingerprint (sha256 of the bytes), and refuse duplicate ids."""
    if not path.exists():
        raise DatasetError(f"the input {path} does not exist")
    digest = hashlib.sha256()
    files = _parquet_files(path) if fmt == "parquet" else [path]
    size = 0
    mtime = 0
    for file in files:
        st = file.stat()
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    has_id = _has_id_column(path, fmt, id_column)
    rows = 0
    hashes = array.array("q")  # 8 bytes an id, not a Python int each
    if fmt == "parquet":
        # Only the id column is read; without one, the footers' row counts are enough.
        for file in files:
            pf = pq.ParquetFile(file)
            if not has_id:
                rows += pf.metadata.num_rows
                continue
            for ids in pf.iter_batches(batch_size=65536, columns=[id_column]):
                for value in ids.column(0).to_pylist():
                    rows += 1
                    if value is not None and value != "":
                        hashes.append(hash(str(value)))
    elif not has_id and fmt == "jsonl":
        with _open_bytes(path) as fh:  # positions are ids: count rows the way _iter_jsonl does
            rows = sum(1 for raw in fh if raw.strip())
    else:
        for rows_batch in read_rows(path, fmt):
            for row in rows_batch:
                rows += 1
                rid = row_id(row, fmt, id_column, has_id)
                if rid is not None:
                    hashes.append(hash(rid))
    if hashes:
        _refuse_duplicates(path, fmt, id_column, has_id, np.frombuffer(hashes, dtype=np.int64))
        del hashes
    return InputScan(rows, digest.hexdigest()[:32], has_id, size, mtime)


def _has_id_column(path: Path, fmt: str, id_column: str) -> bool:
    if fmt == "openai_batch":
        return True
    if fmt == "parquet":
        schema = pq.ParquetFile(_parquet_files(path)[0]).schema_arrow
        return id_column in schema.names
    for row in _iter_jsonl(path):
        if row.data is not None:
            return id_column in row.data
    return False


def _refuse_duplicates(path: Path, fmt: str, id_column: str, has_id: bool, hashes: np.ndarray) -> None:
    ordered = hashes
    ordered.sort()  # in place: the scan's only per-row memory is these 8 bytes
    dup_hashes = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not dup_hashes:
        return
    # Second pass, only over the suspects, to name them with their rows.
    seen: dict[str, list[str]] = {}
    for batch in read_rows(path, fmt):
        for row in batch:
            rid = row_id(row, fmt, id_column, has_id)
            if rid is not None and hash(rid) in dup_hashes:
                seen.setdefault(rid, []).append(row.where)
    dups = [(rid, wheres) for rid, wheres in seen.items() if len(wheres) > 1]
    if not dups:
        return
    column = "custom_id" if fmt == "openai_batch" else id_column
    shown = "; ".join(f"'{rid}' at {', '.join(w[:3])}" for rid, w in dups[:5])
    more = f" (and {len(dups) - 5} more)" if len(dups) > 5 else ""
    raise DatasetError(
        f"{path}: {len(dups)} duplicate values in the id column '{column}': {shown}{more}. "
        "Each row needs its own id; nothing was sent."
    )
