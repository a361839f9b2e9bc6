"""A folder of images and videos as a job's input (``batchkimi caption``, or ``input`` naming a
folder).

The folder is walked (recursively, in sorted order, skipping hidden files and folders) and each
file is kept by what its bytes are, an image or a video; ``include``/``exclude`` are shell
patterns over the path relative to the folder (``*`` crosses ``/``). The walk is written to the
output as an index, ``_media_index.jsonl``, one line per file ever seen, and that index is the
job's input: a file's line number is its row position, its relative path is its id. A rerun
rewrites the index but never moves a line:

- a new file gets a new line at the end, and is sent;
- a file whose size or modification time changed is hashed; if its content (sha256) differs
  from what its output row was made from, it is sent again, and its new row supersedes the old
  (a file only touched is not);
- a file that is gone keeps its line (``"gone": true``) and its output row, marked
  ``media_gone``; it comes back unmarked if the file does.

Symbolic links are followed only to files inside the folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..errors import ConfigError, OutputError
from ..files import fsync_dir
from .sniff import inspect

INDEX = "_media_index.jsonl"


@dataclass
class FolderScan:
    """The index after a walk, and what changed since the last one."""

    root: Path
    entries: list[dict[str, Any]]
    new: int = 0
    restamped: list[int] = field(default_factory=list)  # size or time changed: perhaps the content
    changed: list[int] = field(default_factory=list)  # content changed since its row was made (see stale_positions)
    gone: list[int] = field(default_factory=list)  # positions whose file is gone (now)
    back: list[int] = field(default_factory=list)  # positions gone before, present again
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> Counter[str]:
        return Counter(e["kind"] for e in self.entries if not e.get("gone"))

    def lines(self) -> list[str]:
        kinds = self.kinds
        out = [f"{self.root}: {kinds.get('image', 0):,} images, {kinds.get('video', 0):,} videos; "
               f"{self.new:,} new, {len(self.changed):,} changed, {len(self.gone):,} gone since the last run"]
        for reason, n in sorted(self.skipped.items()):
            out.append(f"  skipped {n:,}: {reason}")
        out += [f"    e.g. {x}" for x in self.skipped_examples[:3]]
        return out


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], p) for p in patterns)


def walk(root: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
         skipped: Counter[str] | None = None, examples: list[str] | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, stat) of every regular file under ``root``, in sorted order."""
    skipped = skipped if skipped is not None else Counter()
    examples = examples if examples is not None else []

    def skip(reason: str, rel: str) -> None:
        skipped[reason] += 1
        if len(examples) < 5:
            examples.append(rel)

    def visit(folder: Path, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        try:
            with os.scandir(folder) as it:
                found = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skip(f"folders that cannot be read ({exc.strerror})", prefix or ".")
            return
        for entry in found:
            rel = prefix + entry.name
            if entry.name.startswith("."):
                continue  # hidden: .DS_Store, .git, editors' files
            try:
                if entry.is_symlink():
                    real = Path(os.path.realpath(entry.path))
                    if not real.is_relative_to(root):
                        skip("symbolic links to outside the folder", rel)
                        continue
                    st = real.stat()
                    if stat.S_ISDIR(st.st_mode):
                        skip("symbolic links to folders (not followed)", rel)
                        continue
                else:
                    st = entry.stat(follow_symlinks=False)
            except OSError:
                skip("files that cannot be read", rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from visit(Path(entry.path), rel + "/")
            elif not stat.S_ISREG(st.st_mode):
                skip("special files (not regular files)", rel)
            elif include and not _matches(rel, include):
                continue
            elif exclude and _matches(rel, exclude):
                continue
            else:
                yield rel, st

    yield from visit(root, "")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_index(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise OutputError(f"{path} line {n} is damaged; rerun with --overwrite to start the folder afresh") from None
            entries.append(entry)
    return entries


def write_index(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        for e in entries:
            fh.write(orjson.dumps(e) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def scan_folder(root: Path, old: list[dict[str, Any]], include: tuple[str, ...] = (),
                exclude: tuple[str, ...] = ()) -> FolderScan:
    """Walk ``root`` against the previous index ``old``: positions kept, new files appended."""
    if not root.is_dir():
        raise ConfigError(f"the input folder {root} does not exist")
    root = Path(os.path.realpath(root))
    entries = [dict(e) for e in old]
    at = {e["id"]: i for i, e in enumerate(entries)}
    scan = FolderScan(root, entries)
    seen: set[int] = set()
    for rel, st in walk(root, include, exclude, scan.skipped, scan.skipped_examples):
        pos = at.get(rel)
        entry = entries[pos] if pos is not None else None
        same_stamp = entry is not None and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
        if same_stamp and entry is not None:
            found: dict[str, Any] = {k: entry[k] for k in ("mime", "width", "height", "problem") if k in entry}
            kind = entry["kind"]
        else:
            seen_as = inspect(str(root / rel))
            if seen_as is None:
                scan.skipped["files that are not images or videos"] += 1
                if len(scan.skipped_examples) < 5:
                    scan.skipped_examples.append(rel)
                continue
            kind, found = seen_as
        line = {"id": rel, "kind": kind, kind: rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, **found}
        if entry is None:
            at[rel] = len(entries)
            seen.add(len(entries))
            entries.append(line)
            scan.new += 1
            continue
        assert pos is not None
        seen.add(pos)
        if entry.get("gone"):
            scan.back.append(pos)
        if same_stamp:
            if entry.get("gone"):
                entries[pos] = {**line, **({"sha256": entry["sha256"]} if entry.get("sha256") else {})}
            continue
        try:
            digest = sha256_file(root / rel)
        except OSError:
            digest = None
        if digest is not None and digest == entry.get("sha256"):
            entries[pos] = {**line, "sha256": digest}  # touched, not changed
            continue
        entries[pos] = {**line, "sha256": digest} if digest else line
        scan.restamped.append(pos)
    for pos, entry in enumerate(entries):
        if pos not in seen and not entry.get("gone"):
            entry["gone"] = True
            scan.gone.append(pos)
    return scan
