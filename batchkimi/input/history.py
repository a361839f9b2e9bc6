"""What an output remembers of its input, so that an input that only *grew* resumes.

Rows are resumed by position, so a rerun on a changed input is refused: old answers would be
filed under other rows. But the common change is harmless: rows appended to a JSONL file, new
files added to a Parquet folder. For that an output keeps, beside its manifest:

- for a JSONL (or OpenAI batch) input, ``_input_rows.npy``: an 8-byte digest of each row's line;
- for a Parquet input, the manifest's ``input.files``: each file's name, size and sha256.

When the input's fingerprint differs, :func:`first_change` compares: if every old row (or
file) is still there, in the same place, and only new ones follow, the input grew and the run
sends just the new rows; otherwise it names the first row (or file) that changed.
"""

from __future__ import annotations

import array
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .reader import BOM, InputScan, open_bytes

ROWS_FILE = "_input_rows.npy"
LINE_FORMATS = ("jsonl", "openai_batch")


def line_digests(path: Path) -> np.ndarray:
    """An 8-byte digest of each data row's line, in row order (blank lines are no rows)."""
    out = array.array("Q")
    with open_bytes(path) as fh:
        for n, raw in enumerate(fh):
            if n == 0 and raw.startswith(BOM):
                raw = raw[3:]
            line = raw.strip()
            if line:
                out.append(int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little"))
    return np.frombuffer(out, dtype=np.uint64) if len(out) else np.zeros(0, dtype=np.uint64)


def remember(out: Path, path: Path, fmt: str, scan: InputScan) -> dict[str, Any]:
    """Record the input's rows (a file beside the manifest) or files (returned, for the manifest:
    the scan hashed each file in its one pass over the bytes)."""
    if fmt in LINE_FORMATS:
        np.save(out / ROWS_FILE, line_digests(path), allow_pickle=False)
        return {}
    if fmt == "parquet":
        return {"files": [list(f) for f in scan.files]}
    return {}


def first_change(out: Path, path: Path, fmt: str, old: dict[str, Any], scan: InputScan) -> str | None:
    """None when the input only grew since ``old`` (the manifest's ``input``); else what changed
    first, naming the row or file. Also a message when the output recorded too little to tell."""
    if fmt in LINE_FORMATS:
        try:
            before = np.load(out / ROWS_FILE, allow_pickle=False)
        except (OSError, ValueError):
            return "the output recorded no digest of its input's rows, so a grown input cannot be told from a changed one"
        now = line_digests(path)
        shared = min(len(before), len(now))
        differ = np.flatnonzero(before[:shared] != now[:shared])
        if differ.size:
            return f"its data row {int(differ[0]) + 1} (counting non-blank lines) is not what it was"
        if len(now) < len(before):
            return f"it has {len(now):,} rows where it had {len(before):,}"
        return None
    if fmt == "parquet":
        files = old.get("files")
        if not files:
            return "the output recorded none of its input's files, so a grown input cannot be told from a changed one"
        now_files = [list(f) for f in scan.files]
        for i, (name, size, sha) in enumerate(files):
            if i >= len(now_files):
                return f"its file {name} is gone"
            if now_files[i] != [name, size, sha]:
                there = now_files[i][0]
                return (f"its file {name} changed" if there == name else
                        f"{there} now comes before {name} (new files must sort after the old ones)")
        return None
    return "only JSONL and Parquet inputs can grow"
