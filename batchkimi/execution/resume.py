"""What an output says about the runs that made it: the manifest, and whether this job may
resume over it.

- :func:`refuse_foreign_output`: never write into a non-empty folder batchkimi did not make;
- :func:`check_resume`: refuse an output made by other requests, or from an input whose old
  rows changed (one that only grew resumes: :mod:`batchkimi.input.history`);
- :func:`manifest_of`: the manifest a run writes when it starts and when it ends.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import orjson

from ..config import SIMULATOR_PACING, Job
from ..errors import OutputError
from ..input.folder import FolderScan
from ..input.history import first_change
from ..input.reader import InputScan
from ..output.sink import MANIFEST
from ..version import __version__
from .summary import Summary


def refuse_foreign_output(out: Path) -> None:
    """Never write into, or delete, a non-empty directory that batchkimi did not make."""
    if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise OutputError(
            f"{out} is not empty and holds no {MANIFEST}: it is not a batchkimi output. "
            "Choose another --output; batchkimi will not write into or delete it."
        )


def check_resume(manifest: dict[str, Any] | None, job: Job, scan: InputScan | None, out: Path,
                 path: Path | None = None, fmt: str | None = None, *, shown: str | None = None) -> bool:
    """Refuse to resume over results of another input (``scan`` None: a folder, whose index
    carries its own history) or of other requests. True when the input grew since (rows
    appended, files added: see :mod:`batchkimi.input.history`), which resumes."""
    if not manifest:
        return False
    name = shown or str(out)  # a remote output is named by its URL, not by its local copy
    fresh = f"Use a new --output, or pass --overwrite to delete {name} and start fresh."
    was_folder = manifest.get("input", {}).get("format") == "folder"
    if was_folder != (scan is None):
        kind = "a folder of images and videos" if was_folder else "a dataset file"
        raise OutputError(f"{name} holds the results of {kind}. {fresh}")
    old_input = manifest.get("input", {})
    grew = False
    if scan is not None and old_input.get("fingerprint") != scan.fingerprint:
        why = None
        if (old_input.get("has_id_column"), old_input.get("id_prefix", "row-")) != (scan.has_id_column, scan.id_prefix):
            why = "its ids are made differently now"
        elif path is not None and fmt is not None:
            why = first_change(out, path, fmt, old_input, scan)
        if why is not None or path is None:
            raise OutputError(f"the input changed since {name} was written: {why or 'its fingerprint differs'}. "
                              f"Rows that only follow the old ones resume; changed rows do not. {fresh}")
        grew = True
    old = dict(manifest.get("request_settings", {}))
    new = orjson.loads(orjson.dumps(job.request_settings(fmt if scan is not None else "folder")))
    # Older outputs recorded 'auto' and the simulator's pacing: read them as this version would write them.
    if old.get("input_format") == "auto":
        old["input_format"] = new["input_format"]
    if isinstance(old.get("simulator"), dict):
        old["simulator"] = {k: v for k, v in old["simulator"].items() if k not in SIMULATOR_PACING}
    # A key the old manifest does not record (added since) cannot be compared: it passes.
    changed = [k for k in sorted(new) if k in old and old.get(k) != new.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k, '(not recorded)')!r} -> {new.get(k)!r}" for k in changed[:6])
        why = ""
        if "base_url" in changed and "simulator" in (str(old.get("base_url")), str(new.get("base_url"))):
            why = " Answers from the simulator never pass for real ones (or the other way round)."
        raise OutputError(f"{name} was made by a job that sends different requests or sends them elsewhere ({diff}).{why} {fresh}")
    return grew


def manifest_of(job: Job, path: Path, fmt: str, scan: InputScan, old: dict[str, Any] | None, state: str,
                summary: Summary | None = None, folder: FolderScan | None = None,
                history: dict[str, Any] | None = None, spend: dict[str, Any] | None = None) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    runs = list((old or {}).get("runs", []))
    if summary is None:
        runs.append({"started": now, "batchkimi_version": __version__})
    elif runs:
        runs[-1].update({"finished": now, "state": state, **summary.as_dict()})
    return {
        "batchkimi_version": __version__,
        "state": state,
        "simulated": job.uses_simulator,
        "job": job.public_dict(),
        "request_settings": job.request_settings("folder" if folder is not None else fmt),
        "input": {
            "path": str(folder.root if folder is not None else path),
            "format": "folder" if folder is not None else fmt,
            "fingerprint": scan.fingerprint,
            "rows": scan.rows,
            "has_id_column": scan.has_id_column,
            "id_prefix": scan.id_prefix,
            "size_bytes": scan.size_bytes,
            "mtime_ns": scan.mtime_ns,
            **(history if history is not None else {k: v for k, v in (old or {}).get("input", {}).items() if k == "files"}),
        },
        "counts": summary.final_status if summary else (old or {}).get("counts", {}),
        "spend": spend if spend is not None else (old or {}).get("spend", {}),
        "created": (old or {}).get("created", now),
        "updated": now,
        "runs": runs[-50:],
    }
