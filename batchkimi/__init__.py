"""batchkimi: large batches of Kimi chat completions on Tencent Cloud TokenHub.

Library use::

    import batchkimi
    job = batchkimi.load_job("jobs/demo.toml")
    summary = batchkimi.run(job)               # in a notebook: await batchkimi.run_async(job)
    df = batchkimi.read_results(job.output)

The names below are imported when first used, so ``import batchkimi`` (and ``batchkimi
--help``) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# The house, lowest first: a module imports its own room and the layers below, never a room
# beside or above it (tests/test_layers.py checks the code against this). A row goes up the
# middle: input -> request -> execution (policy and http on the way) -> output.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "events", "kimi", "tokens", "stats", "exit_codes", "files", "version"),  # the foundation: pure, no I/O
    ("storage",),  # URLs of object stores, and the local copies worked on (fsspec)
    ("config",),  # the job: what to read, send and write
    ("policy",),  # decisions with no I/O: retry, disposition, rate limits, budget, rerun
    ("input", "output", "http"),  # the edges: reading rows, writing results, one HTTP attempt
    ("request",),  # a row into a request body
    ("execution",),  # the plan, the run, the executors (local, Ray), the row engine
    ("scoring",),  # a pass over an output after the run
    ("report",),  # reading outputs for people: report, compare, export, HTML
    ("api", "progress"),  # the doors (run, run_async, dry_run, RowEngine) and the CLI's progress bar
    ("cli_common",), ("cli_outputs",), ("cli",),  # the command line
    ("__main__", "batchkimi"),  # the package's face
)
# Rooms kept apart: what each may be imported by (it imports only the foundation).
APART: dict[str, tuple[str, ...]] = {"simulator": ("api", "cli")}

# public name -> the module that defines it
_PUBLIC = {
    "Job": "batchkimi.config", "load_job": "batchkimi.config", "resolve_api_key": "batchkimi.config",
    "run": "batchkimi.api", "run_async": "batchkimi.api", "dry_run": "batchkimi.api", "RowEngine": "batchkimi.api",
    "Summary": "batchkimi.execution.summary", "DryRunReport": "batchkimi.execution.summary",
    "build_request": "batchkimi.request", "Prepared": "batchkimi.request", "RowInvalid": "batchkimi.request",
    "read_results": "batchkimi.output.sink",
    "BatchKimiError": "batchkimi.errors", "JobError": "batchkimi.errors", "ConfigError": "batchkimi.errors",
    "MissingKeyError": "batchkimi.errors", "DatasetError": "batchkimi.errors", "OutputError": "batchkimi.errors",
    "FatalAPIError": "batchkimi.errors", "APIError": "batchkimi.errors",
}

__all__ = [
    "APART", "LAYERS",
    "APIError", "BatchKimiError", "ConfigError", "DatasetError", "DryRunReport", "FatalAPIError", "Job", "JobError",
    "MissingKeyError", "OutputError", "Prepared", "RowEngine", "RowInvalid", "Summary", "__version__", "build_request",
    "dry_run", "load_job", "read_results", "resolve_api_key", "run", "run_async",
]

if TYPE_CHECKING:
    from .api import RowEngine, dry_run, run, run_async
    from .config import Job, load_job, resolve_api_key
    from .errors import (
        APIError,
        BatchKimiError,
        ConfigError,
        DatasetError,
        FatalAPIError,
        JobError,
        MissingKeyError,
        OutputError,
    )
    from .execution.summary import DryRunReport, Summary
    from .output.sink import read_results
    from .request import Prepared, RowInvalid, build_request


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'batchkimi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
