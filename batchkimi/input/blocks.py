"""An input cut into blocks that can be read alone: the unit a Ray actor takes.

A JSONL block is a byte offset and a row range (a compressed file cannot be cut: everything
before a block would have to be read); a Parquet block is a row range inside one row group of
one file. Rows are numbered as :mod:`batchkimi.input.reader` numbers them.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DatasetError
from ..storage.location import filesystem, is_url
from .reader import BOM, SourceRow, iter_jsonl, parquet_file, parquet_files, reading


def jsonl_block_rows(path: Path, offset: int, lines: int, start: int, stop: int, *, url: str | None = None,
                     end: int | None = None, options: dict[str, Any] | None = None) -> Iterator[SourceRow]:
    """The rows of one :func:`jsonl_blocks` block; read from the object at ``url`` when given
    (one ranged read of the block's bytes, ``offset`` to ``end``), else from ``path``."""
    if url is None or end is None:
        return iter_jsonl(path, stop_after=stop, start=(offset, lines, start))
    fs, key = filesystem(url, options)
    with reading(path, f"bytes {offset}-{end}"):
        data = fs.cat_file(key, start=offset, end=end)  # one ranged GET: the block's bytes, nothing around them
    return iter_jsonl(path, stop_after=stop, start=(0, lines, start), opener=functools.partial(io.BytesIO, data))


def jsonl_blocks(path: Path, block_rows: int, limit: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(byte offset, lines before, first row, row after the last, byte offset after the last)
    of each run of ``block_rows`` rows below ``limit``, counted as the reader counts them: a
    block can be read alone with :func:`jsonl_block_rows`."""
    if path.name.lower().endswith(".gz"):
        raise DatasetError(f"{path} is compressed: a block cannot be read without everything before it. "
                           "Decompress it (gunzip -k) or convert it to Parquet for a Ray run")
    offset = lineno = pos = 0
    begin: tuple[int, int, int] | None = None
    with reading(path), open(path, "rb") as fh:
        for raw in fh:
            if (raw.removeprefix(BOM) if lineno == 0 else raw).strip():
                if begin is None:
                    if pos >= limit:
                        return
                    begin = (offset, lineno, pos)
                pos += 1
            offset += len(raw)
            lineno += 1
            if begin is not None and (pos - begin[2] >= block_rows or pos >= limit):
                yield (*begin, pos, offset)
                begin = None
    if begin is not None:
        yield (*begin, pos, offset)


def parquet_blocks(path: Path, block_rows: int, limit: int) -> Iterator[tuple[str, int, int, int]]:
    """(file, first row in the file, first row overall, row after the last) of each run of at
    most ``block_rows`` rows below ``limit``; a block never spans two files or row groups."""
    pos = 0
    for file in parquet_files(path):
        meta = parquet_file(file).metadata
        in_file = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            for first in range(0, n, block_rows):
                if pos >= limit:
                    return
                count = min(block_rows, n - first, limit - pos)
                yield str(file), in_file + first, pos, pos + count
                pos += count
            in_file += n


@functools.lru_cache(maxsize=1)
def _parquet(file: str, options: str = "{}") -> pq.ParquetFile:
    """A local file, or an object in a store (its footer read once per worker, its row groups
    read as ranges); ``options``: the store's, as JSON (a cache key)."""
    if is_url(file):
        fs, key = filesystem(file, json.loads(options))
        with reading(Path(key), "its footer"):
            return pq.ParquetFile(fs.open(key, "rb"))
    return parquet_file(Path(file))


@functools.lru_cache(maxsize=1)
def _row_group(file: str, group: int, options: str = "{}") -> pa.Table:
    """One row group, kept until the next is read: a row group of a million rows holds thousands
    of blocks, and the blocks a worker gets come in order, so it reads each group once, not once
    a block."""
    return _parquet(file, options).read_row_group(group)


def parquet_block_rows(file: str, first: int, start: int, stop: int,
                       options: dict[str, Any] | None = None) -> Iterator[SourceRow]:
    """The rows of one :func:`parquet_blocks` block, numbered as :func:`_iter_parquet` does;
    ``file`` may be the URL of an object (``options``: its store's)."""
    path = Path(file.split("://", 1)[-1])
    key = json.dumps(options or {}, sort_keys=True, default=str)
    meta = _parquet(file, key).metadata
    at = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if at + n > first:
            with reading(path, f"row {first}"):
                records = _row_group(file, g, key).slice(first - at, stop - start).to_pylist()
            for i, record in enumerate(records):
                yield SourceRow(start + i, f"row {first + i} of {path.name}", record)
            return
        at += n
