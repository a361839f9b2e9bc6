"""The writer's lock on a remote output, and a writer's start there.

:class:`ObjectLock` is an object created only if absent (a conditional PUT, ``If-None-Match:
*``), refreshed while the run lives; a lock whose run died (its process gone on this host, or
no heartbeat for ``stale_s``) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import OutputError
from .location import redact
from .remote import LOCK, RemoteFolder, describe, store_errors


class ObjectLock:
    """One writer per remote output (see the module docstring). ``stale_s``: how long a lock
    may go without a heartbeat before another run takes it over (heartbeats every third of it)."""

    def __init__(self, folder: RemoteFolder, stale_s: float = 90.0) -> None:
        self.folder = folder
        self.path = folder.key(LOCK)
        self.stale_s = stale_s
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "beat": time.time()}).encode()

    def _create(self) -> bool:
        try:
            self.folder.fs.pipe_file(self.path, self._body(), mode="create")
        except FileExistsError:
            return False
        except Exception as exc:  # noqa: BLE001 - translated below, as store_errors does
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise OutputError(describe(self.folder.url, "create the lock on", exc)) from None
        return True

    def _holder(self) -> dict[str, Any] | None:
        data = self.folder.read(LOCK)
        if data is None:
            return None
        try:
            return dict(json.loads(data))
        except ValueError:
            return {}

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._start()
                return
            holder = self._holder()
            if holder is None:
                continue  # released in between: try again
            age = time.time() - float(holder.get("beat", 0) or 0)
            dead_here = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
            if not dead_here and age < self.stale_s:
                who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}, alive {age:.0f}s ago"
                raise OutputError(f"{redact(self.folder.url)} is being written by another batchkimi run ({who}); wait "
                                  f"for it or use another --output (a lock without a heartbeat for {self.stale_s:g}s "
                                  "is taken over)")
            with contextlib.suppress(FileNotFoundError), store_errors(self.folder.url, "take over the lock of"):
                self.folder.fs.rm_file(self.path)  # its run is dead: take the lock over
        raise OutputError(f"{redact(self.folder.url)}: could not take the output's lock (another run keeps taking it)")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="batchkimi-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_s / 3):
            try:
                holder = self._holder()
                if holder is not None and holder.get("owner") != self.owner:
                    self.lost = True
                    return
                self.folder.fs.pipe_file(self.path, self._body())
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried at the next; the stale window allows two
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with contextlib.suppress(Exception):
            holder = self._holder()
            if holder is not None and holder.get("owner") == self.owner:
                self.folder.fs.rm_file(self.path)


def open_remote(folder: RemoteFolder, *, overwrite: bool, ours: Callable[[Iterable[str]], bool]) -> ObjectLock:
    """A writer's start on a remote output: refuse a non-empty folder that ``ours`` does not
    recognise (never written into or emptied), take the lock, empty it (``overwrite``) and
    pull. The lock is held on return; release it when done."""
    held = folder.listing()
    if held and not ours(held):
        raise OutputError(f"{redact(folder.url)} is not empty and holds no batchkimi output (no _manifest.json, no part-*.parquet): it is not a batchkimi output. "
                          "Choose another --output; batchkimi will not write into or delete it.")
    lock = ObjectLock(folder)
    lock.acquire()
    try:
        if overwrite:
            folder.clear()
        if overwrite or not held:  # a new output: what the local copy holds (a journal) is of one deleted since
            folder.forget_local()
        folder.pull()
    except BaseException:
        lock.release()
        raise
    return lock


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except PermissionError:
        return True  # someone else's process
    except (OSError, ValueError, TypeError):
        return False
    return True
