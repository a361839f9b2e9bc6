"""What a newcomer meets first: the package's names, the sync door inside a running loop, the
CLI with nothing to run, and the dry run's cost line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

import batchkimi
from batchkimi.cli import cli

from .conftest import write_jsonl


def test_the_package_exports_what_its_readme_uses() -> None:
    """Errors to catch, the dry run, and build_request (the README's RowEngine example needs it)."""
    for name in ("Job", "load_job", "run", "run_async", "dry_run", "RowEngine", "build_request", "read_results",
                 "Summary", "JobError", "ConfigError", "DatasetError", "OutputError", "FatalAPIError", "APIError"):
        assert getattr(batchkimi, name) is not None, name
    assert issubclass(batchkimi.ConfigError, batchkimi.JobError)
    with pytest.raises(AttributeError):
        batchkimi.no_such_name  # noqa: B018


def test_run_inside_a_running_loop_says_to_await_run_async(tmp_path: Path) -> None:
    job = batchkimi.Job(input=str(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])), output=str(tmp_path / "o"),
                        base_url="simulator")

    async def in_a_notebook() -> None:
        batchkimi.run(job)

    with pytest.raises(batchkimi.ConfigError, match="await batchkimi.run_async"):
        asyncio.run(in_a_notebook())
    assert not (tmp_path / "o").exists()


def test_run_with_nothing_to_run_says_what_to_give(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENHUB_API_KEY", raising=False)
    res = CliRunner().invoke(cli, ["run"])
    assert res.exit_code == 1 and "give a job file" in res.output and "API key" not in res.output


def test_the_dry_run_says_its_prompt_tokens_are_a_total_and_a_missing_price(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "prompt": "word " * 40} for i in range(10)])
    base = ["run", "--input", str(data), "--output", str(tmp_path / "o"), "--base-url", "simulator", "--dry-run"]
    res = CliRunner().invoke(cli, base)
    assert res.exit_code == 0 and "prompt tokens in all" in res.output
    unknown = CliRunner().invoke(cli, [*base, "--model", "ep-1234"])
    assert unknown.exit_code == 0 and "no cost estimate: no price for ep-1234" in unknown.output
