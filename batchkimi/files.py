"""Files that survive a crash: a folder's entry made durable after a rename; a folder emptied
but for the file a writer holds."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a file renamed into it survives a power cut (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def empty_folder(path: Path, keep: str) -> None:
    """Delete everything in ``path`` but the entry named ``keep`` (a lock held); a symbolic link
    is removed, never followed."""
    for entry in path.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
