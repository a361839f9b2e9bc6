"""The journal: results not yet in a Parquet part, as JSON lines in ``OUTPUT/_journal/seg-<seq>.jsonl``.

A batch of results is one ``write`` to the OS the moment it arrives, so a SIGKILL loses
nothing that was written; :meth:`Journal.sync` fsyncs it (the writer calls it at least every
second while anything is unsynced) for power loss. Every write is checked: a short write is
finished, and a failed one raises ``OSError`` for the caller to name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson

SEGMENT = re.compile(r"^seg-(\d{6,})\.jsonl$")


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` (``os.write`` may write fewer than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(f"write returned {n}")
        view = view[n:]


def encode_rows(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in rows)


class Journal:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._fd: int | None = None
        self.seq = 0
        self.rows = 0
        self.bytes = 0
        self.dirty = False

    def segment_path(self, seq: int) -> Path:
        return self.dir / f"seg-{seq:06d}.jsonl"

    def left_over(self) -> list[tuple[int, Path]]:
        """Segments a killed run left, oldest first."""
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := SEGMENT.match(p.name))]
        return sorted(found)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self, seq: int) -> None:
        self.seq = seq
        self._fd = os.open(self.segment_path(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.rows = self.bytes = 0

    def append(self, data: bytes, rows: int) -> None:
        assert self._fd is not None, "open a segment first"
        write_all(self._fd, data)
        self.rows += rows
        self.bytes += len(data)
        self.dirty = True

    def sync(self) -> None:
        if self._fd is not None and self.dirty:
            os.fsync(self._fd)
            self.dirty = False

    def close(self) -> Path | None:
        """Close the open segment (fsync'ed); its path, or None if none was open."""
        if self._fd is None:
            return None
        fd, self._fd = self._fd, None
        try:
            if self.dirty:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.dirty = False
        return self.segment_path(self.seq)
