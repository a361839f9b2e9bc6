"""Rate limits, bursts of failures and a full disk, through whole runs against the simulator."""

from __future__ import annotations

import errno
from pathlib import Path

import pandas as pd
import pytest

import batchkimi
from batchkimi.errors import OutputError
from batchkimi.output.sink import Sink

from .conftest import fast_job, write_jsonl


def prompts(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"What is {i} + 1?"} for i in range(n)]


@pytest.mark.parametrize("retry_after", ["seconds", "none"])
def test_server_rpm_429s_slow_every_worker_and_every_row_ends_ok(tmp_path: Path, simulator, retry_after: str) -> None:
    """No client cap, a server allowing 8 per second: 429s are retried after a shared cool-down."""
    h = simulator(rpm=8, window_s=1.0, retry_after=retry_after)
    data = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    job = fast_job(tmp_path, h.base_url, input=str(data), concurrency=16, max_attempts=20, backoff_base_s=0.5, backoff_max_s=2.0,
                   max_retry_time_s=120, thinking="disabled", stream=False)
    summary = batchkimi.run(job)
    stats = h.simulator.stats
    assert summary.final_status == {"ok": 40} and summary.rate_limited > 0
    assert stats["by_status"][429] == summary.rate_limited
    # a storm would answer most requests with 429; the shared cool-down and the AIMD cut keep it bounded
    assert stats["by_status"][429] < 2 * stats["by_status"][200]


def test_overload_and_5xx_bursts_are_retried_to_the_end(tmp_path: Path, simulator) -> None:
    h = simulator(fail_rate=0.35, seed=11, fail_faults=["500", "502", "503", "504", "overload", "cut", "html"])
    data = write_jsonl(tmp_path / "in.jsonl", prompts(60))
    summary = batchkimi.run(fast_job(tmp_path, h.base_url, input=str(data), max_attempts=12))
    df = batchkimi.read_results(tmp_path / "out")
    assert summary.final_status == {"ok": 60} and summary.retries > 5
    assert df["attempts"].max() > 1 and len(df) == 60


def test_quota_429_is_not_retried_and_stops_the_job(tmp_path: Path, raw_server) -> None:
    from aiohttp import web

    async def quota(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "You exceeded your current token quota: <org> 0, please check your account balance",
                                            "type": "exceeded_current_quota_error"}}, status=429)

    srv = raw_server(quota)
    data = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    summary = batchkimi.run(fast_job(tmp_path, srv.base_url, input=str(data), concurrency=1))
    assert summary.exit_code == 1 and "exceeded_current_quota_error" in summary.fatal
    assert len(srv.requests) == 1


def test_disk_full_mid_run_is_a_job_error_and_written_parts_stay_valid(tmp_path: Path, simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    job = fast_job(tmp_path, h.base_url, input=str(data), rows_per_part=10, concurrency=2, thinking="disabled", stream=False)
    real_append = Sink.append
    calls = {"n": 0}

    def append(self: Sink, rows: list[dict]) -> bool:
        calls["n"] += len(rows)
        if calls["n"] > 25:
            raise self._os_error(OSError(errno.ENOSPC, "No space left on device"), "write results to the journal")
        return real_append(self, rows)

    monkeypatch.setattr(Sink, "append", append)
    with pytest.raises(OutputError, match="the disk is full.*run the same command to resume"):
        batchkimi.run(job)
    partial = pd.read_parquet(tmp_path / "out")
    assert 10 <= len(partial) <= 25 and partial["id"].is_unique
    monkeypatch.setattr(Sink, "append", real_append)
    again = batchkimi.run(job)
    assert again.final_status == {"ok": 40} and len(pd.read_parquet(tmp_path / "out")) == 40
