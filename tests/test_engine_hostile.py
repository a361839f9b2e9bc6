"""The engine under hostile replies, interruptions and mistakes (issue "Never hang, never pay
twice"). Real HTTP on loopback; every run is bounded in time, so a hang fails the test
instead of hanging the suite."""

from __future__ import annotations

import asyncio
import json
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

import batchkimi
from batchkimi.api import RowEngine
from batchkimi.config import Job
from batchkimi.errors import DatasetError, JobError, OutputError
from batchkimi.http.response import Answer, Usage
from batchkimi.http.transport import Reply
from batchkimi.output.sink import Sink
from batchkimi.policy.ratelimit import RateLimiter
from batchkimi.policy.retry import RetryPolicy
from batchkimi.request import build_request

from .conftest import TEST_KEY, chunk, fast_job, json_reply, sse, stream_reply, write_jsonl

USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def bounded(job: Job, seconds: float = 60, **kw: Any) -> batchkimi.Summary:
    """Run a job; a run that does not end within ``seconds`` fails the test."""
    async def go() -> batchkimi.Summary:
        return await asyncio.wait_for(batchkimi.run_async(job, **kw), seconds)

    return asyncio.run(go())


def completion(**message: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "kimi-k2.6",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", **message}}], "usage": USAGE}


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(n)]


# ---- 1, 5: replies that cannot be understood are that row's error, never a dead worker ----

HOSTILE = [
    pytest.param(completion(content="", tool_calls=[{"id": "c", "type": "function", "function": "get_weather"}]),
                 "choices[0].message.tool_calls[0].function", id="function-is-a-string"),
    pytest.param(completion(content=["not", "parts"]), "choices[0].message.content", id="content-list-of-strings"),
    pytest.param({**completion(content="hi"), "choices": {"0": {}}}, "choices", id="choices-an-object"),
]


@pytest.mark.parametrize("body,field", HOSTILE)
def test_a_reply_of_the_wrong_shape_is_an_error_row_naming_the_field(tmp_path: Path, raw_server, body: Any, field: str) -> None:
    """Every row ends (no hang, no dead worker), each an error naming the offending field; tried twice at most."""
    srv = raw_server(json_reply(body))
    data = write_jsonl(tmp_path / "in.jsonl", rows(12))
    summary = bounded(fast_job(tmp_path, srv.base_url, input=str(data), stream=False, concurrency=3, max_attempts=6))
    df = batchkimi.read_results(tmp_path / "out")
    assert summary.final_status == {"error": 12} and len(df) == 12
    assert (df["error_type"] == "bad_response").all() and (df["attempts"] == 2).all()
    assert len(srv.requests) == 24  # a malformed 200 is paid for twice at most, not max_attempts times
    assert df["error_message"].str.contains(field, regex=False).all(), df["error_message"][0]


def test_tool_call_arguments_sent_as_an_object_are_kept_as_json_text(tmp_path: Path, raw_server) -> None:
    body = completion(content="", tool_calls=[{"id": "c0", "type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}}])
    srv = raw_server(json_reply(body))
    data = write_jsonl(tmp_path / "in.jsonl", rows(3))
    bounded(fast_job(tmp_path, srv.base_url, input=str(data), stream=False))
    df = batchkimi.read_results(tmp_path / "out")
    assert (df["status"] == "ok").all()
    assert json.loads(df["tool_calls"][0])[0]["function"]["arguments"] == '{"city":"Paris"}'


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_id_of_the_wrong_type_neither_fails_the_row_nor_poisons_the_output(tmp_path: Path, raw_server, stream: bool) -> None:
    """`"id": 12345` is metadata: the answer is kept, the output opens, and a rerun on it works."""
    if stream:
        srv = raw_server(stream_reply(sse({**chunk({"content": "hi"}), "id": 12345, "model": ["x"]}, {**chunk({}, "stop", USAGE), "id": 12345})))
    else:
        srv = raw_server(json_reply({**completion(content="hi"), "id": 12345, "model": {"a": 1}}))
    data = write_jsonl(tmp_path / "in.jsonl", rows(5))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=stream, max_tokens=2000)
    assert bounded(job).final_status == {"ok": 5}
    df = batchkimi.read_results(job.output)
    assert set(df["request_id"]) == {"12345"} and set(df["model"]) == {"kimi-k2.6"}
    assert bounded(job).final_status == {"ok": 5}  # the output reopens


def test_a_journal_value_of_the_wrong_type_becomes_null_not_a_dead_output(tmp_path: Path) -> None:
    """A segment written by something else (an older version) still opens: the bad value is null, the row kept."""
    out = tmp_path / "out"
    sink = Sink(out)
    sink.prepare()
    sink.append([{"id": "a", "row": 0, "status": "ok", "content": "fine", "finished_at": 1}])
    with open(sink.journal.segment_path(sink.journal.seq), "ab") as seg:
        seg.write(b'{"id": 12345, "row": 1, "status": "ok", "prompt_tokens": "many", "attempts": 99999999999, "finished_at": 2}\n')
    sink.unlock()  # the process died
    again = Sink(out)
    again.prepare()
    again.unlock()
    df = batchkimi.read_results(out)
    assert list(df["id"]) == ["a", "12345"] and df["prompt_tokens"].isna().tolist() == [True, True]


def test_a_hook_that_raises_stops_the_job_with_a_clear_error_and_loses_nothing(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", rows(40))
    seen = []

    def hook(event: Any) -> None:
        seen.append(event)
        if type(event).__name__ == "RowFinished" and len(seen) > 30:
            raise ValueError("my progress bar broke")

    with pytest.raises(JobError, match="hook raised ValueError: my progress bar broke"):
        bounded(fast_job(tmp_path, h.base_url, input=str(data), concurrency=4, max_tokens=2000), hook=hook)
    df = batchkimi.read_results(tmp_path / "out")
    answered = h.simulator.stats["by_status"][200]
    assert (df["status"] == "ok").sum() == answered  # every paid answer was written
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["state"] == "failed"


def test_parquet_values_orjson_cannot_serialise_are_sent_as_json(tmp_path: Path, simulator) -> None:
    """Decimals and maps with integer keys, in messages and kept columns, never kill a worker."""
    h = simulator()
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.decimal128(5, 2))]))
    table = pa.table({
        "id": ["a", "b"],
        "messages": pa.array([[{"role": "user", "content": "hi", "weight": Decimal("0.50")}]] * 2, type=msg_type),
        "extra": pa.array([[(1, "x")], [(2, "y")]], type=pa.map_(pa.int64(), pa.string())),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    job = fast_job(tmp_path, h.base_url, input=str(tmp_path / "in.parquet"), keep_columns=("extra",), max_tokens=2000)
    assert bounded(job).final_status == {"ok": 2}
    assert batchkimi.read_results(job.output)["extra"][0] == '[[1,"x"]]'


# ---- 2: a reader failing mid-way ----


def test_a_parquet_file_damaged_after_its_first_batch_stops_the_job_naming_it(tmp_path: Path, simulator) -> None:
    h = simulator()
    n = 3000
    table = pa.table({"prompt": [f"question number {i} " + "x" * (i % 50) for i in range(n)]})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=1024, compression="zstd")
    meta = pq.ParquetFile(path).metadata
    rg = meta.row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    start = rg.data_page_offset + 40
    raw[start : start + 200] = os.urandom(200)  # the second row group's data is garbage now
    path.write_bytes(bytes(raw))
    job = fast_job(tmp_path, h.base_url, input=str(path), max_tokens=2000, concurrency=4)
    with pytest.raises(DatasetError, match="in.parquet"):
        bounded(job)
    df = batchkimi.read_results(job.output)
    assert len(df) >= 1 and (df["status"] == "ok").all()  # what was done is written


# ---- 3, 22: the door for other schedulers ----


class Exploding:
    """A transport that fails with a bug, or hangs until cancelled."""

    def __init__(self, how: str) -> None:
        self.how = how

    async def complete(self, body: dict, *, stream: bool, payload: bytes | None = None, sample: int = 0) -> Reply:
        if self.how == "raise":
            raise RuntimeError("a bug in a transport")
        await asyncio.sleep(3600)
        raise AssertionError


def test_row_engine_releases_its_slot_on_any_exception_and_on_cancellation() -> None:
    job = Job(model="kimi-k2.6", prompt_template="{q}", concurrency=2)
    prepared = build_request({"q": "hi"}, job)

    async def go() -> int:
        limiter = RateLimiter(concurrency=2)
        raising = RowEngine(job, Exploding("raise"), limiter, RetryPolicy.no_wait())
        for i in range(5):  # more than the concurrency: a leaked slot would block here
            with pytest.raises(RuntimeError):
                await asyncio.wait_for(raising.process(f"q{i}", i, prepared), 5)
        hanging = RowEngine(job, Exploding("hang"), limiter, RetryPolicy.no_wait())
        tasks = [asyncio.ensure_future(hanging.process(f"h{i}", i, prepared)) for i in range(2)]
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        permit = await asyncio.wait_for(limiter.acquire(), 5)  # both slots came back
        limiter.release(permit)
        return limiter.in_flight

    assert asyncio.run(go()) == 0


def test_row_engine_create_starts_the_simulator_for_base_url_simulator() -> None:
    job = Job(base_url="simulator", prompt_template="What is {a} + {a}?", max_tokens=200, simulator={"shape": "short"})

    async def go() -> list[dict[str, Any]]:
        async with RowEngine.create(job, "sk-any") as engine:
            return [await engine.process(f"q{i}", i, build_request({"a": i}, job)) for i in range(3)]

    out = asyncio.run(go())
    assert [r["status"] for r in out] == ["ok"] * 3


# ---- 4: cancelling the run ----


def test_cancelling_run_async_ends_every_task_and_frees_the_output(tmp_path: Path, simulator) -> None:
    h = simulator(latency_ms=300)
    data = write_jsonl(tmp_path / "in.jsonl", rows(80))
    job = fast_job(tmp_path, h.base_url, input=str(data), concurrency=8, max_tokens=2000, flush_interval_s=0.1)

    async def go() -> set[asyncio.Task[Any]]:
        task = asyncio.ensure_future(batchkimi.run_async(job))
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(go()) == set()
    assert bounded(job).final_status == {"ok": 80}  # the lock was dropped; the run resumes


# ---- 6, 7, 8: paying twice, keeping wrong answers ----


def test_overwrite_is_refused_while_another_run_holds_the_output(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", rows(3))
    job = fast_job(tmp_path, h.base_url, input=str(data), max_tokens=2000)
    bounded(job)
    holder = Sink(Path(job.output))
    holder.prepare()  # another run is writing
    try:
        with pytest.raises(OutputError, match="being written by another batchkimi run"):
            bounded(job, overwrite=True)
        assert len(batchkimi.read_results(job.output)) == 3 and (Path(job.output) / "_manifest.json").exists()
    finally:
        holder.unlock()
    assert bounded(job, overwrite=True).final_status == {"ok": 3}


def test_a_simulated_rehearsal_never_passes_for_real_answers(tmp_path: Path, simulator, raw_server) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", rows(3))
    rehearsal = fast_job(tmp_path, "simulator", input=str(data), max_tokens=2000, simulator={"shape": "short"})
    assert bounded(rehearsal).final_status == {"ok": 3}
    real = raw_server(json_reply(completion(content="real")))
    with pytest.raises(OutputError, match="simulator"):
        bounded(fast_job(tmp_path, real.base_url, input=str(data), max_tokens=2000))
    assert real.requests == []
    with pytest.raises(OutputError, match="simulator"):  # the rehearsal's own settings are part of it too
        bounded(fast_job(tmp_path, "simulator", input=str(data), max_tokens=2000, simulator={"shape": "short", "accuracy": 0.5}))


def test_changing_keep_columns_on_resume_gives_one_schema(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q{i}", "a": f"a{i}", "b": f"b{i}"} for i in range(10)])
    first = fast_job(tmp_path, h.base_url, input=str(data), keep_columns=("a",), max_tokens=2000, limit=4)
    bounded(first)
    bounded(first.replace(keep_columns=("a", "b"), limit=None))
    out = Path(first.output)
    schemas = {pq.read_schema(p).remove_metadata() for p in out.glob("part-*.parquet")}
    assert len(schemas) == 1
    df = pd.read_parquet(out).sort_values("row")
    assert df["b"].isna().tolist() == [True] * 4 + [False] * 6 and df["a"].notna().all()
    assert duckdb.sql(f"select count(b) from '{out}/*.parquet'").fetchall()[0][0] == 6


# ---- 9: the journal ----


def test_the_journal_is_fsynced_within_a_second_even_when_no_new_result_arrives(tmp_path: Path, monkeypatch) -> None:
    """The second answer is held back until the first one's journal write was fsync'ed."""
    synced = asyncio.Event()
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        real_fsync(fd)
        loop.call_soon_threadsafe(synced.set)

    class Transport:
        calls = 0

        async def complete(self, body: dict, *, stream: bool, payload: bytes | None = None, sample: int = 0) -> Reply:
            Transport.calls += 1
            if Transport.calls > 1:
                await asyncio.wait_for(synced.wait(), 10)  # fails the row (and the test) if no fsync comes
            answer = Answer("ok", None, None, "stop", Usage(1, 1, 2, 0), "kimi-k2.6", "x")
            return Reply(answer, 200, "req", None)

    data = write_jsonl(tmp_path / "in.jsonl", rows(2))
    job = fast_job(tmp_path, "http://unused.invalid/v1", input=str(data), concurrency=1, flush_interval_s=3600)

    async def go() -> batchkimi.Summary:
        nonlocal loop
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(os, "fsync", spy)
        return await asyncio.wait_for(batchkimi.run_async(job, transport=Transport()), 30)

    loop: Any = None
    assert asyncio.run(go()).final_status == {"ok": 2}


def test_short_writes_to_the_journal_are_completed(tmp_path: Path, simulator, monkeypatch) -> None:
    h = simulator()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # the OS takes 7 bytes at a time
    data = write_jsonl(tmp_path / "in.jsonl", rows(20))
    assert bounded(fast_job(tmp_path, h.base_url, input=str(data), max_tokens=2000)).final_status == {"ok": 20}
    df = batchkimi.read_results(tmp_path / "out")
    assert len(df) == 20 and df["content"].notna().all()


# ---- 12, 25: job-wide failures stop early ----


def test_the_first_rows_all_failing_alike_stop_the_job_early(tmp_path: Path, raw_server) -> None:
    """LiteLLM in front of Kimi: every row gets the same 400. Stop after 20, quoting it; resumable."""
    body = {"error": {"message": "litellm.UnsupportedParamsError: ['thinking'] is not supported", "type": "invalid_request_error"}}
    srv = raw_server(json_reply(body, 400))
    data = write_jsonl(tmp_path / "in.jsonl", rows(300))
    summary = bounded(fast_job(tmp_path, srv.base_url, input=str(data), concurrency=4))
    assert summary.exit_code == 1 and "UnsupportedParamsError" in (summary.fatal or "")
    assert len(srv.requests) <= 20 + 4
    assert summary.pending_rows >= 300 - 24


def test_a_row_specific_400_among_successes_never_stops_the_job(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "first", "prompt": "hello"}]
                       + [{"id": f"r{i}", "prompt": f"bad one [[sim:400]] {i}"} for i in range(40)])
    summary = bounded(fast_job(tmp_path, h.base_url, input=str(data), concurrency=1, max_tokens=2000))
    assert summary.fatal is None and summary.final_status == {"ok": 1, "error": 40}


def test_an_unreachable_host_stops_the_job_within_seconds(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused, and no other server takes the port
        port = s.getsockname()[1]
        data = write_jsonl(tmp_path / "in.jsonl", rows(500))
        t0 = time.monotonic()
        summary = bounded(fast_job(tmp_path, f"http://127.0.0.1:{port}/v1", input=str(data), concurrency=4), 30)
    assert summary.exit_code == 1 and "could not reach the server" in (summary.fatal or "")
    assert summary.pending_rows == 500 and time.monotonic() - t0 < 25


# ---- 14: connections are reused ----


def test_streams_whose_body_ends_after_done_keep_their_connections(tmp_path: Path, raw_server) -> None:
    """Over a real network the chunked body's end arrives a moment after [DONE]: read it, reuse the connection."""
    peers: set[Any] = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(chunk({"content": "hi"}), chunk({}, "stop", USAGE)))
        await asyncio.sleep(0.02)
        await resp.write_eof()
        return resp

    srv = raw_server(handler)
    data = write_jsonl(tmp_path / "in.jsonl", rows(60))
    assert bounded(fast_job(tmp_path, srv.base_url, input=str(data), concurrency=4, max_tokens=2000)).final_status == {"ok": 60}
    assert len(srv.requests) == 60 and len(peers) <= 8  # 60 without the fix


# ---- 15: usage-less streams ----


def test_streams_without_usage_ask_for_it_and_never_read_as_free(tmp_path: Path, raw_server) -> None:
    srv = raw_server(stream_reply(sse(chunk({"content": "hi"}), chunk({}, "stop"))))
    data = write_jsonl(tmp_path / "in.jsonl", rows(3))
    summary = bounded(fast_job(tmp_path, srv.base_url, input=str(data), model="gpt-4o-mini", stream=True))
    assert srv.requests[0]["body"]["stream_options"] == {"include_usage": True}  # kimi_rules off: ask for usage
    assert summary.rows_without_usage == 3 and summary.cost_text() == "unknown"
    assert any("3 answered rows came without token usage" in line for line in summary.lines())
    assert summary.as_dict()["cost_usd"] is None


# ---- 21: the key never leaves ----


def test_a_server_quoting_the_key_back_never_gets_it_stored(tmp_path: Path, raw_server) -> None:
    body = {"error": {"type": "invalid_request_error", "message": f"bad request from key {TEST_KEY}"}}
    srv = raw_server(json_reply(body, 400))
    data = write_jsonl(tmp_path / "in.jsonl", rows(2))
    summary = bounded(fast_job(tmp_path, srv.base_url, input=str(data), stream=False))
    out = Path(tmp_path / "out")
    df = batchkimi.read_results(out)
    assert "bad request from key ***" in df["error_message"][0]
    texts = [(out / "_manifest.json").read_text(), df.to_json(date_format="iso"), "\n".join(summary.lines())]
    assert not any(TEST_KEY in t for t in texts)


# ---- 23: ids ----


def test_a_generated_id_never_collides_with_a_real_one(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "row-1", "prompt": "a"}, {"prompt": "no id"}, {"id": "_row-5", "prompt": "b"}])
    bounded(fast_job(tmp_path, h.base_url, input=str(data), max_tokens=2000))
    df = batchkimi.read_results(tmp_path / "out")
    assert df["id"].is_unique and df.loc[1, "status"] == "invalid" and df.loc[1, "id"] == "__row-1"


def test_a_bug_building_a_request_stops_the_run_naming_the_row_and_the_row_stays_pending(tmp_path: Path, simulator,
                                                                                         monkeypatch) -> None:
    """Only a row that cannot make a request is `invalid` (a done status): a bug stops the run,
    resumable, naming the row, and once it is fixed the same command sends that row."""
    from batchkimi.execution import rows as runner

    real = runner.build_request

    def fragile(row: dict, job: Job, **kw: Any) -> Any:
        if row.get("id") == "r3":
            raise KeyError("a value nobody expected")
        return real(row, job, **kw)

    monkeypatch.setattr(runner, "build_request", fragile)
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", rows(6))
    job = fast_job(tmp_path, h.base_url, input=str(data), max_tokens=2000, concurrency=1)
    with pytest.raises(JobError, match=r"line 4 of in.jsonl: KeyError: 'a value nobody expected'"):
        bounded(job)
    df = batchkimi.read_results(tmp_path / "out")
    assert "r3" not in set(df["id"]) and (df["status"] == "ok").all()  # written: what was done; r3 pending
    monkeypatch.setattr(runner, "build_request", real)  # the bug is fixed
    summary = bounded(job)
    assert summary.final_status == {"ok": 6}
