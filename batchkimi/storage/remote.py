"""A remote folder and its local working copy: pulled and pushed as whole objects.

batchkimi's output code works on a local folder (a journal appended line by line, parts made
atomic by a rename). An object store has neither appends nor renames, so a remote output is
worked on in a local copy (under :func:`cache_root`, one folder per URL) and mirrored:

- :meth:`RemoteFolder.pull` fetches the objects that changed since this copy last saw them
  (by size and ETag), and drops local files the store no longer holds that this copy had
  pushed (another run replaced the output);
- :meth:`RemoteFolder.push` uploads each local file that changed, as one whole object (a PUT:
  a reader sees the old object or the new one, never half of one), then deletes the objects
  whose files are gone (new parts first, so a reader never sees fewer rows than before);
- what is local only is never pushed: the journal (``_journal/``), the lock, temporary files.

The writer's lock on the store is :mod:`.lock`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, JobError, OutputError
from ..files import empty_folder
from .location import filesystem, is_url, redact

log = logging.getLogger("batchkimi")

LOCK = ".lock"
STATE = ".remote.json"  # in the local copy: what the store held when this copy last matched it
_LOCAL_ONLY = re.compile(r"^(_journal|\.lock|\.remote\.json|\..*\.tmp|\.write-probe)$")


@contextlib.contextmanager
def store_errors(url: str, doing: str, error: type[JobError] = OutputError) -> Iterator[None]:
    """The one place a store's exceptions (OSError, botocore's, any library's) become a
    one-line batchkimi error naming the URL and what was being done; FileNotFoundError passes."""
    try:
        yield
    except (FileNotFoundError, JobError):
        raise
    except Exception as exc:  # noqa: BLE001 - a store library raises what it likes: translated here, once
        raise error(describe(url, doing, exc)) from None


def describe(url: str, doing: str, exc: BaseException) -> str:
    scheme = url.split("://", 1)[0]
    if "Credentials" in type(exc).__name__ or "credentials" in str(exc).lower():
        return (f"cannot {doing} {redact(url)}: no credentials for {scheme}:// were found (the store's own chain: "
                "environment variables, a profile, an instance role); set them and run the same command again")
    return f"cannot {doing} {redact(url)}: {type(exc).__name__}: {redact(str(exc))}"


def cache_root() -> Path:
    """Where local copies live: ``$BATCHKIMI_CACHE_DIR``, else ``$XDG_CACHE_HOME/batchkimi``,
    else ``~/.cache/batchkimi``."""
    if env := os.environ.get("BATCHKIMI_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchkimi"


def copy_dir(url: str, purpose: str) -> Path:
    """The local copy of ``url`` for ``purpose`` (``output``: a writer's; ``read``: a reader's;
    ``input``: a fetched dataset): readable names, and a hash so two URLs never share one (and
    two spellings of one folder, with and without its trailing slash, do)."""
    url = url.rstrip("/")
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", redact(url).split("://", 1)[-1]).strip("_")[-80:]
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return cache_root() / purpose / f"{plain}-{digest}"


def _identity(info: dict[str, Any]) -> list[Any]:
    """What tells one version of an object from another: its size and ETag (or time)."""
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or info.get("LastModified")
    return [info.get("size"), str(tag) if tag is not None else None]


class RemoteFolder:
    """``url``'s objects (one level, and the folders under it) and a local copy at ``local``."""

    def __init__(self, url: str, local: Path, options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = filesystem(url, options)
        self.local = Path(local)
        self._state: dict[str, Any] = {}

    # ---- the store ---------------------------------------------------------------------
    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def listing(self) -> dict[str, dict[str, Any]]:
        """Every object under the folder, by its name relative to it."""
        try:
            with store_errors(self.url, "list"):
                self.fs.invalidate_cache(self.root)
                found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            name = path[len(self.root):].lstrip("/") if path.startswith(self.root) else path
            if name and info.get("type", "file") == "file" and not _LOCAL_ONLY.match(name.split("/", 1)[0]):
                out[name] = info
        return out

    def read(self, name: str) -> bytes | None:
        try:
            with store_errors(self.url, f"read {name} from"):
                data = self.fs.cat_file(self.key(name))
        except FileNotFoundError:
            return None
        return bytes(data)

    # ---- the local copy ----------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.local / STATE).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        tmp = self.local / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self._state, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.local / STATE)

    def _local_files(self) -> dict[str, os.stat_result]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.local):
            rel = os.path.relpath(dirpath, self.local)
            if rel == ".":
                dirnames[:] = [d for d in dirnames if not _LOCAL_ONLY.match(d)]
            for f in filenames:
                name = f if rel == "." else f"{rel}/{f}"
                if not _LOCAL_ONLY.match(name.split("/", 1)[0]):
                    out[name.replace(os.sep, "/")] = os.stat(os.path.join(dirpath, f))
        return out

    def pull(self) -> None:
        """Make the local copy hold what the store holds (see the module docstring)."""
        self.local.mkdir(parents=True, exist_ok=True)
        self._state = self._load_state()
        remote = self.listing()
        local = self._local_files()
        root = self.local.resolve()
        for name, info in list(remote.items()):
            if not (root / name).resolve().is_relative_to(root) or "\\" in name:
                # a key like "photos/../../x" would land outside the copy: never written, never read
                log.warning("batchkimi: skipping %s in %s: its name leads outside the folder", name, redact(self.url))
                del remote[name]
                continue
            ident = _identity(info)
            st = local.get(name)
            known = self._state.get(name)
            if st is not None and known and known["remote"] == ident and known["local"] == [st.st_size, st.st_mtime_ns]:
                continue
            target = self.local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            with store_errors(self.url, f"download {name} from"):
                self.fs.get_file(self.key(name), str(tmp))
            os.replace(tmp, target)
            st2 = target.stat()
            self._state[name] = {"remote": ident, "local": [st2.st_size, st2.st_mtime_ns]}
        for name in set(local) - set(remote):
            if name in self._state:  # pushed once, gone from the store since: the output was replaced
                (self.local / name).unlink(missing_ok=True)
                del self._state[name]
        for name in set(self._state) - set(remote):
            self._state.pop(name, None)
        self._save_state()

    def push(self) -> None:
        """Upload what changed locally, then delete what is gone (see the module docstring)."""
        if not self._state:
            self._state = self._load_state()
        local = self._local_files()
        for name, st in sorted(local.items(), key=lambda kv: kv[0].startswith("_manifest")):  # the manifest last
            known = self._state.get(name)
            if known and known["local"] == [st.st_size, st.st_mtime_ns]:
                continue
            with store_errors(self.url, f"upload {name} to"):
                self.fs.put_file(str(self.local / name), self.key(name))
                info = self.fs.info(self.key(name))
            self._state[name] = {"remote": _identity(info), "local": [st.st_size, st.st_mtime_ns]}
        for name in sorted(set(self._state) - set(local)):
            try:
                with store_errors(self.url, f"delete {name} from"):
                    self.fs.rm_file(self.key(name))
            except FileNotFoundError:
                pass
            del self._state[name]
        self._save_state()

    def forget_local(self) -> None:
        """Empty the local copy (its ``.lock``, which the writer holds, stays)."""
        if self.local.is_dir():
            empty_folder(self.local, LOCK)
        self._state = {}

    def clear(self) -> None:
        """Delete every object of the folder but the lock (``--overwrite``)."""
        for name in self.listing():
            with contextlib.suppress(FileNotFoundError), store_errors(self.url, f"delete {name} from"):
                self.fs.rm_file(self.key(name))
        self._state = {}


def runs_under(url: str) -> list[tuple[str, dict[str, Any]]]:
    """The run outputs directly under the folder at ``url`` (a nightly job's): each one's URL and
    manifest (one read each; folders without a readable manifest are no run)."""
    fs, root = filesystem(url)
    try:
        with store_errors(url, "list"):
            fs.invalidate_cache(root)
            entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        key = str(entry["name"]).rstrip("/")
        name = key.rsplit("/", 1)[-1]
        try:
            with store_errors(url, f"read the manifest of {name} in"):
                data = fs.cat_file(f"{key}/_manifest.json")
            manifest = json.loads(data)
        except (FileNotFoundError, ValueError):
            continue
        if isinstance(manifest, dict):
            found.append((f"{url.rstrip('/')}/{name}", manifest))
    return found


def output_copy(output: str, options: dict[str, Any] | None = None) -> RemoteFolder | None:
    """The writer's copy of a remote output (None for a local one): what a run left there is
    scored or graded in it, then pushed."""
    return RemoteFolder(output, copy_dir(output, "output"), options) if is_url(output) else None


def fetch_input(url: str, options: dict[str, Any] | None = None) -> Path:
    """A local copy of the dataset or media folder at ``url``: fetched the first time, then
    only the objects whose size or ETag changed. A folder keeps its layout; a file its name
    (its suffix tells its format)."""
    fs, path = filesystem(url, options)
    try:
        with store_errors(url, "read the input", ConfigError):
            fs.invalidate_cache(path)
            info = fs.info(path)
    except FileNotFoundError:
        raise ConfigError(f"input {redact(url)} does not exist") from None
    home = copy_dir(url, "input")
    if info.get("type") == "directory":
        folder = RemoteFolder(url, home, options)
        folder.pull()
        return folder.local
    home.mkdir(parents=True, exist_ok=True)
    target = home / (path.rsplit("/", 1)[-1] or "input")
    state = home / STATE
    ident = _identity(info)
    try:
        known = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = None
    if known == ident and target.is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    with store_errors(url, "read the input", ConfigError):
        fs.get_file(path, str(tmp))
    os.replace(tmp, target)
    state.write_text(json.dumps(ident), encoding="utf-8")
    return target
