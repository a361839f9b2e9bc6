"""Read a dataset in bounded batches: JSONL (optionally .gz), Parquet (a file or a folder of
files), or an OpenAI Batch API request file. Never the whole file in memory.

Each row is a :class:`SourceRow` with its 0-based position among the data rows (blank lines
are not rows). A line that is not valid JSON is still a row, carrying its error, so that it
becomes an ``invalid`` output row instead of ending the job.

:func:`scan_input` makes one pass before anything is sent: it counts rows, fingerprints
the file's bytes, and finds duplicate ids.

A file that cannot be read (missing, not gzip, truncated, not Parquet, damaged after its first
batch) raises :class:`~batchkimi.errors.DatasetError` naming the file and the line or row
reached: the translation happens here, once, for every reading path.
"""

from __future__ import annotations

import array
import contextlib
import gzip
import hashlib
import io
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DatasetError, json_type

BATCH_ROWS = 1024
BOM = b"\xef\xbb\xbf"
_GENERATED_ID = re.compile(r"^(_*)row-\d+$")
# What reading a file can raise: I/O, a bad or truncated gzip stream, a damaged Parquet file.
_READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException, ValueError)


@contextlib.contextmanager
def reading(path: Path, where: str = "") -> Iterator[None]:
    """Turn any failure to read ``path`` into a DatasetError naming it (and ``where``)."""
    try:
        yield
    except DatasetError:
        raise
    except _READ_ERRORS as exc:
        raise read_error(path, where, exc) from exc


def read_error(path: Path, where: str, exc: BaseException) -> DatasetError:
    if isinstance(exc, FileNotFoundError):
        return DatasetError(f"the input {path} does not exist")
    at = f" at {where}" if where else ""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
    if isinstance(exc, EOFError):
        why = "the compressed stream ends early (a truncated file?)"
    return DatasetError(f"cannot read {path}{at}: {why}")



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
    id_prefix: str = "row-"  # for rows without an id: never the start of a real id "row-N"
    # a Parquet input's files, [relative name, size, sha256] each, from the same pass (empty for JSONL)
    files: tuple[tuple[str, int, str], ...] = ()


def detect_format(path: Path, declared: str = "auto") -> str:
    """``jsonl``, ``parquet``, ``openai_batch`` or ``folder`` (of images and videos: a folder
    holding any ``.parquet`` file is a Parquet dataset)."""
    if declared != "auto":
        return declared
    if path.is_dir():
        has_parquet = any(p.name.endswith(".parquet") and not p.name.startswith((".", "_")) for p in path.rglob("*.parquet"))
        return "parquet" if has_parquet else "folder"
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz")):
        for row in iter_jsonl(path, stop_after=1):
            if row.data is not None and "custom_id" in row.data and isinstance(row.data.get("body"), dict):
                return "openai_batch"
            break
        return "jsonl"
    raise DatasetError(f"cannot tell the format of {path}: name it .jsonl, .jsonl.gz or .parquet, or set input_format")


def open_bytes(path: Path) -> io.BufferedIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
        if not files:
            raise DatasetError(f"the folder {path} holds no .parquet files")
        return files
    return [path]


def iter_jsonl(path: Path, stop_after: int | None = None, skip_until: int = 0,
                start: tuple[int, int, int] = (0, 0, 0), opener: Callable[[], Any] | None = None) -> Iterator[SourceRow]:
    """``start``: (byte offset, lines before it, rows before it), from :func:`jsonl_blocks`;
    ``opener``: opens the bytes (an object in a store) instead of ``path``, which names them."""
    offset, lineno, pos = start
    name = path.name
    with reading(path, "the start"), (opener() if opener is not None else open_bytes(path)) as fh:
        if offset:
            fh.seek(offset)
        lines = iter(fh)
        while True:
            try:
                raw = next(lines, None)
            except _READ_ERRORS as exc:  # a truncated or damaged gzip stream, an I/O error
                raise read_error(path, f"line {lineno + 1}", exc) from exc
            if raw is None:
                return
            lineno += 1
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[3:]
            if not raw.strip():
                continue
            if pos == 0 and raw.lstrip()[:1] == b"[":
                raise DatasetError(
                    f"{path} holds a JSON array, not JSON Lines (one object per line): convert it, for "
                    f"example with: jq -c '.[]' {name} > {path.stem}.jsonl"
                )
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
                    yield SourceRow(pos, where, None, f"{where} is {json_type(value)}, not a JSON object")
            pos += 1
            if stop_after is not None and pos >= stop_after:
                return


def parquet_file(file: Path) -> pq.ParquetFile:
    with reading(file, "its footer"):
        return pq.ParquetFile(file)


def _iter_parquet(path: Path, skip_until: int = 0) -> Iterator[SourceRow]:
    pos = 0
    for file in parquet_files(path):
        pf = parquet_file(file)
        n = pf.metadata.num_rows
        if pos + n <= skip_until:
            pos += n
            continue
        first = pos  # rows are numbered within each file in messages, from 0
        batches = pf.iter_batches(batch_size=BATCH_ROWS)
        while True:
            with reading(file, f"row {pos - first}"):
                batch = next(batches, None)
                if batch is None:
                    break
                if pos + batch.num_rows <= skip_until:
                    pos += batch.num_rows
                    continue
                records = batch.to_pylist()
            for record in records:
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
        rows = iter_jsonl(path, skip_until=skip_until)
    batch: list[SourceRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def row_id(row: SourceRow, fmt: str, id_column: str, has_id_column: bool, id_prefix: str = "row-") -> str | None:
    """The row's id as text; a stable ``row-<pos>`` when the dataset has no id column; None
    when it has one and this row's is missing (the caller makes an id with ``id_prefix``)."""
    if fmt == "openai_batch":
        value = row.data.get("custom_id") if row.data else None
    elif has_id_column:
        value = row.data.get(id_column) if row.data else None
    else:
        return f"{id_prefix}{row.pos}"
    if value is None or isinstance(value, dict | list) or value == "":
        return None
    return str(value)


def scan_input(path: Path, fmt: str, id_column: str) -> InputScan:
    """One pass: count, fingerprint (sha256 of the bytes), and refuse duplicate ids."""
    with reading(path):
        return _scan_input(path, fmt, id_column)


def _scan_input(path: Path, fmt: str, id_column: str) -> InputScan:
    if not path.exists():
        raise DatasetError(f"the input {path} does not exist")
    digest = hashlib.sha256()
    files = parquet_files(path) if fmt == "parquet" else [path]
    size = 0
    mtime = 0
    base = path if path.is_dir() else path.parent
    per_file: list[tuple[str, int, str]] = []
    for file in files:
        st = file.stat()
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
        one = hashlib.sha256()
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
                one.update(block)
        per_file.append((file.relative_to(base).as_posix(), st.st_size, one.hexdigest()))
    has_id = _has_id_column(path, fmt, id_column)
    rows = 0
    hashes = array.array("q")  # 8 bytes an id, not a Python int each
    underscores = -1  # the most leading underscores on a real id shaped like "row-N"

    def note(rid: str) -> None:
        nonlocal underscores
        if "row-" in rid and (m := _GENERATED_ID.match(rid)):
            underscores = max(underscores, len(m.group(1)))
        hashes.append(hash(rid))

    if fmt == "parquet":
        # Only the id column is read; without one, the footers' row counts are enough.
        for file in files:
            pf = parquet_file(file)
            if not has_id:
                rows += pf.metadata.num_rows
                continue
            with reading(file, f"its column '{id_column}'"):
                for ids in pf.iter_batches(batch_size=65536, columns=[id_column]):
                    for value in ids.column(0).to_pylist():
                        rows += 1
                        if value is not None and value != "":
                            note(str(value))
    elif not has_id and fmt == "jsonl":
        with open_bytes(path) as stream:  # positions are ids: count rows the way iter_jsonl does
            first = stream.readline()
            rows = int(bool(first.removeprefix(BOM).strip())) + sum(1 for raw in stream if raw.strip())
    else:
        for rows_batch in read_rows(path, fmt):
            for row in rows_batch:
                rows += 1
                rid = row_id(row, fmt, id_column, has_id)
                if rid is not None:
                    note(rid)
    if hashes:
        _refuse_duplicates(path, fmt, id_column, has_id, np.frombuffer(hashes, dtype=np.int64))
        del hashes
    prefix = "_" * (underscores + 1) + "row-"
    return InputScan(rows, digest.hexdigest()[:32], has_id, size, mtime, prefix,
                     tuple(per_file) if fmt == "parquet" else ())


def columns_seen(path: Path, fmt: str, sample_rows: int = 1000) -> set[str]:
    """The dataset's columns: a Parquet schema's, or the keys of the first JSONL rows."""
    if fmt == "parquet":
        return set(parquet_file(parquet_files(path)[0]).schema_arrow.names)
    seen: set[str] = set()
    for row in iter_jsonl(path, stop_after=sample_rows):
        if row.data is not None:
            seen.update(row.data)
    return seen


def _has_id_column(path: Path, fmt: str, id_column: str) -> bool:
    if fmt == "openai_batch":
        return True
    if fmt == "parquet":
        return id_column in parquet_file(parquet_files(path)[0]).schema_arrow.names
    for row in iter_jsonl(path):
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
