"""The media root: a local path a row names is read only inside it. A path that leaves it
(``..``, an absolute path elsewhere, a symbolic link out) is refused, so a dataset from someone
else cannot send ``~/.ssh/id_rsa`` as an "image"; only regular files are read.
"""

from __future__ import annotations

import contextlib
import os
import stat
import urllib.parse
from pathlib import Path

from .sniff import MediaInvalid


def local_ref(ref: str) -> str | None:
    """The path a reference names, or None for a URL sent as it is."""
    low = ref[:8].lower()
    if low.startswith(("http://", "https://", "data:")):
        return None
    if low.startswith("file://"):
        parsed = urllib.parse.urlsplit(ref)
        if parsed.netloc not in ("", "localhost"):
            raise MediaInvalid(f"{ref!r} names a file on another host")
        return urllib.parse.unquote(parsed.path)
    if "://" in ref[:16]:
        raise MediaInvalid(f"{ref!r}: only http(s), data and file URLs, or local paths, are understood")
    return ref


def resolve(ref: str, root: Path, dirs: dict[str, str] | None = None) -> tuple[str, os.stat_result]:
    """``ref`` as a regular file inside ``root``: its real path (symbolic links followed, then
    checked) and its stat. ``dirs`` caches the real path of folders (many files share one)."""
    root_s = str(root)
    prefix = root_s if root_s.endswith(os.sep) else root_s + os.sep
    name_ = os.path.expanduser(ref) if ref.startswith("~") else ref
    target = name_ if os.path.isabs(name_) else os.path.join(root_s, name_)
    head, name = os.path.split(target)
    if name in ("", ".", "..") or dirs is None:
        real = os.path.realpath(target)  # every link that exists followed; "..", "." gone
    else:
        real_head = dirs.get(head)
        if real_head is None:
            if len(dirs) > 10_000:
                dirs.clear()
            real_head = dirs[head] = os.path.realpath(head)
        real = os.path.join(real_head, name)
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.lstat(real).st_mode):
                real = os.path.realpath(real)
    if not real.startswith(prefix):  # before existence: a dataset learns nothing of other folders
        raise MediaInvalid(f"{ref!r} is outside the media root {root}; "
                           "set media_root to a folder that holds it, if that is intended")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise MediaInvalid(f"{ref!r} does not exist (looked for {target})") from None
    except OSError as exc:
        raise MediaInvalid(f"{ref!r} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise MediaInvalid(f"{ref!r} is not a regular file")
    return real, st
