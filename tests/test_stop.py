"""A stop sends nothing new: after Ctrl-C, SIGTERM, a job-level refusal or the caller's stop,
only requests already in flight may finish; rows waiting for the limiter or a back-off are
pending, sent by the next run. Counted by the server, over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

import batchkimi

from .conftest import TEST_KEY, fast_job, write_jsonl

ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "model": "kimi-k2.6",
          "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "fine"}}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


class Counting:
    """Answers after ``latency_s``; calls ``on_request(n)`` as request n (1-based) arrives."""

    def __init__(self, latency_s: float, on_request: Any = None, reply: Any = None) -> None:
        self.latency_s = latency_s
        self.on_request = on_request
        self.reply = reply
        self.arrivals: list[tuple[float, str]] = []

    async def __call__(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.arrivals.append((time.monotonic(), body["messages"][-1]["content"]))
        n = len(self.arrivals)
        if self.on_request is not None:
            self.on_request(n)
        custom = self.reply(n, body) if self.reply is not None else None
        if custom is not None:
            return custom
        await asyncio.sleep(self.latency_s)
        return web.Response(body=json.dumps(ANSWER).encode(), content_type="application/json")


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(n)]


def run_with_stop_at(tmp_path: Path, raw_server, *, stop_at: int, latency_s: float, reply: Any = None, n_rows: int = 100,
                     **job_kw: Any) -> tuple[batchkimi.Summary, Counting, float]:
    """A run whose stop event is set when the server sees request ``stop_at``; (summary, server, stop time)."""
    stopped_at: list[float] = []
    holder: dict[str, Any] = {}

    def on_request(n: int) -> None:
        if n == stop_at:
            stopped_at.append(time.monotonic())
            holder["loop"].call_soon_threadsafe(holder["stop"].set)

    server = Counting(latency_s, on_request, reply)
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", rows(n_rows))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, **job_kw)

    async def go() -> batchkimi.Summary:
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
        return await asyncio.wait_for(batchkimi.run_async(job, stop=holder["stop"]), 60)

    summary = asyncio.run(go())
    return summary, server, stopped_at[0]


def test_rows_waiting_for_the_limiter_are_not_sent_after_a_stop(tmp_path: Path, raw_server) -> None:
    """rpm 120 and concurrency 50 against 2 s answers: at the stop, dozens of rows wait for a permit.
    None of them goes out; the five in flight finish within the grace period and are written."""
    summary, server, stop_time = run_with_stop_at(tmp_path, raw_server, stop_at=5, latency_s=2.0, rpm=120,
                                                  concurrency=50, grace_s=10)
    assert len(server.arrivals) == 5, [round(t - stop_time, 3) for t, _ in server.arrivals]
    df = batchkimi.read_results(tmp_path / "out")
    assert summary.interrupted and (df["status"] == "ok").sum() == 5 == len(df)
    assert summary.pending_rows == 95


def test_rows_in_a_retry_back_off_at_the_stop_are_not_retried(tmp_path: Path, raw_server) -> None:
    """Every first attempt gets a 503 asking for a 3 s wait; the stop comes during the waits: no retry goes out."""
    def reply(n: int, body: dict[str, Any]) -> web.Response:
        err = {"error": {"type": "service_unavailable", "message": "busy"}}
        return web.Response(status=503, body=json.dumps(err).encode(), content_type="application/json",
                            headers={"Retry-After": "3"})

    summary, server, _ = run_with_stop_at(tmp_path, raw_server, stop_at=4, latency_s=0.0, reply=reply, n_rows=4,
                                          concurrency=4, grace_s=10)
    time.sleep(0.2)
    assert sorted(c for _, c in server.arrivals) == [f"question {i}" for i in range(4)]  # one attempt each, no retry
    assert summary.interrupted and summary.pending_rows == 4  # pending, not error rows: the next run sends them


def test_a_job_level_refusal_sends_nothing_new(tmp_path: Path, raw_server) -> None:
    """A 401 on the fourth request stops the job: rows waiting for a permit are not sent; the three in flight finish."""
    def reply(n: int, body: dict[str, Any]) -> web.Response | None:
        if n == 4:
            err = {"error": {"type": "authentication_error", "code": "401002", "message": "invalid api key"}}
            return web.Response(status=401, body=json.dumps(err).encode(), content_type="application/json")
        return None

    server = Counting(1.5, None, reply)
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", rows(60))
    summary = asyncio.run(asyncio.wait_for(batchkimi.run_async(
        fast_job(tmp_path, srv.base_url, input=str(data), stream=False, rpm=240, concurrency=20, grace_s=10)), 60))
    assert summary.exit_code == 1 and "invalid api key" in (summary.fatal or "")
    assert len(server.arrivals) == 4
    df = batchkimi.read_results(tmp_path / "out")
    assert (df["status"] == "ok").sum() == 3


def test_sigterm_sends_nothing_new_and_the_rerun_pays_nothing_twice(tmp_path: Path, raw_server) -> None:
    """The issue's measurement as a user meets it: `batchkimi run`, SIGTERM, the same command again."""
    server = Counting(2.0)
    srv = raw_server(server)
    write_jsonl(tmp_path / "in.jsonl", rows(12))
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out"\nbase_url = "{srv.base_url}"\nstream = false\n'
                   "rpm = 120\nconcurrency = 50\ngrace_s = 15\nflush_interval_s = 0.2\n")
    env = {**os.environ, "TOKENHUB_API_KEY": TEST_KEY}
    cmd = [sys.executable, "-m", "batchkimi", "run", str(job), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(server.arrivals) < 4:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    sent_at_stop = len(server.arrivals)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert len(server.arrivals) <= sent_at_stop + 1  # at most one attempt that had already started
    before = len(server.arrivals)
    again = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    assert len(server.arrivals) - before == 12 - before  # every row paid exactly once over both runs
