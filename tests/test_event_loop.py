"""The event loop: uvloop by default for the sync door (where it installs), asyncio's own when
asked, and the async door never replaces its caller's loop."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import batchkimi
from batchkimi.cli import cli
from batchkimi.errors import ConfigError
from batchkimi.events import RunStarted

from .conftest import fast_job, write_jsonl

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed on this platform")


class LoopSeen:
    """A hook that notes the running loop's class when the run starts."""

    def __init__(self) -> None:
        self.loop: type | None = None

    def __call__(self, event: object) -> None:
        if isinstance(event, RunStarted):
            self.loop = type(asyncio.get_running_loop())


def small_job(tmp_path: Path, base_url: str, **kw: object) -> batchkimi.Job:
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"What is {i} + 1?"} for i in range(5)])
    return fast_job(tmp_path, base_url, input=str(data), thinking="disabled", stream=False, max_tokens=64, **kw)


def test_the_sync_door_runs_on_uvloop_by_default_and_on_asyncio_when_asked(tmp_path: Path, simulator) -> None:
    h = simulator()
    seen = LoopSeen()
    assert batchkimi.run(small_job(tmp_path, h.base_url), hook=seen).final_status == {"ok": 5}
    assert seen.loop is uvloop.Loop
    seen = LoopSeen()
    job = small_job(tmp_path, h.base_url, output=str(tmp_path / "o2"), event_loop="asyncio")
    assert batchkimi.run(job, hook=seen).final_status == {"ok": 5}
    assert seen.loop is not uvloop.Loop and issubclass(seen.loop, asyncio.BaseEventLoop)


def test_the_async_door_keeps_its_callers_loop(tmp_path: Path, simulator) -> None:
    h = simulator()
    seen = LoopSeen()

    async def caller() -> type:
        await batchkimi.run_async(small_job(tmp_path, h.base_url), hook=seen)
        return type(asyncio.get_running_loop())

    mine = asyncio.run(caller())  # plain asyncio
    assert seen.loop is mine and mine is not uvloop.Loop


def test_uvloop_asked_for_where_it_is_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    job = small_job(tmp_path, "http://127.0.0.1:9/v1", event_loop="uvloop")
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        batchkimi.run(job)
    from batchkimi.api import loop_factory

    assert loop_factory("auto") is None  # auto falls back to asyncio's own loop


def test_the_cli_flag_chooses_the_loop(tmp_path: Path, simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchkimi import api as engine

    asked: list[str] = []
    real = engine.loop_factory
    monkeypatch.setattr(engine, "loop_factory", lambda choice: asked.append(choice) or real(choice))
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    for n, flag in enumerate((["--event-loop", "asyncio"], [])):
        r = CliRunner().invoke(cli, ["run", "--input", str(data), "--output", str(tmp_path / f"o{n}"), "--base-url",
                                     h.base_url, *flag, "--no-thinking", "--quiet"])
        assert r.exit_code == 0, r.output
    assert asked == ["asyncio", "auto"]
    r = CliRunner().invoke(cli, ["run", "--input", str(data), "--output", str(tmp_path / "o3"), "--event-loop", "tokio"])
    assert r.exit_code == 2 and "tokio" in r.output
