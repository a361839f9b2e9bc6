"""Whole runs against the simulator on loopback: input formats, output table, resume, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchkimi
from batchkimi.errors import ConfigError, DatasetError, MissingKeyError, OutputError
from batchkimi.output.sink import RESULT_COLUMNS

from .conftest import TEST_KEY, fast_job, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def reviews(n: int) -> list[dict]:
    words = ["I love it, great", "terrible and broken", "it arrived on Tuesday"]
    return [{"id": f"r{i}", "text": f"{words[i % 3]} #{i}", "gold": ["positive", "negative", "neutral"][i % 3]} for i in range(n)]


TEMPLATE = "Label as one of: positive, negative, neutral.\n\n{text}"


def test_jsonl_run_writes_one_row_per_input_with_the_fixed_schema(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", reviews(30))
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE, keep_columns=("text", "gold"), max_tokens=2048)
    summary = batchkimi.run(job)
    assert summary.exit_code == 0 and summary.final_status == {"ok": 30}
    df = pd.read_parquet(job.output)
    assert len(df) == 30 and df["id"].is_unique
    assert list(df.columns) == RESULT_COLUMNS + ["text", "gold"]
    assert (df["content"] == df["gold"]).all()  # the simulator labels by sentiment words
    assert df["reasoning_content"].str.len().min() > 0
    assert (df["total_tokens"] == df["prompt_tokens"] + df["completion_tokens"]).all()
    assert df["ttft_s"].notna().all() and (df["attempts"] == 1).all() and (df["cost_usd"] > 0).all()
    age = pd.Timestamp.now(tz="UTC") - df["finished_at"]
    assert (age >= pd.Timedelta(0)).all() and (age < pd.Timedelta(minutes=5)).all()
    assert duckdb.sql(f"select count(*) from '{job.output}/*.parquet'").fetchall()[0][0] == 30
    manifest = json.loads((Path(job.output) / "_manifest.json").read_text())
    assert manifest["input"]["rows"] == 30 and manifest["counts"] == {"ok": 30}
    assert manifest["job"]["model"] == "kimi-k2.6" and manifest["batchkimi_version"] == batchkimi.__version__


def test_thinking_default_sends_32768_and_streams_and_never_temperature(tmp_path: Path, raw_server) -> None:
    """Kimi's rules: thinking top-level, max_tokens 32768 when unset, streaming by default, no sampling params."""
    from aiohttp import web

    from .conftest import chunk, sse

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=sse(chunk({"content": "ok"}), chunk({}, "stop", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})),
                            content_type="text/event-stream")

    srv = raw_server(handler)
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    batchkimi.run(fast_job(tmp_path, srv.base_url, input=str(data)))
    body = srv.requests[0]["body"]
    assert body["thinking"] == {"type": "enabled"} and body["max_tokens"] == 32768 and body["stream"] is True
    assert not {"temperature", "top_p", "n", "presence_penalty", "frequency_penalty"} & set(body)
    assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {TEST_KEY}"


def test_parquet_input_without_id_column_uses_positions(tmp_path: Path, simulator) -> None:
    h = simulator()
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": f"What is {i} + 1?"} for i in range(12)]), path)
    job = fast_job(tmp_path, h.base_url, input=str(path), prompt_template="{question}", thinking="disabled", stream=False)
    assert batchkimi.run(job).exit_code == 0
    df = batchkimi.read_results(job.output)
    assert list(df["id"]) == [f"row-{i}" for i in range(12)] and list(df["row"]) == list(range(12))


def test_openai_batch_file_input(tmp_path: Path, simulator) -> None:
    h = simulator()
    job = fast_job(tmp_path, h.base_url, input=str(ROOT / "sample_data/openai_batch.jsonl"))
    summary = batchkimi.run(job)
    df = batchkimi.read_results(job.output)
    assert summary.final_status == {"ok": 8}
    assert sorted(df["id"]) == sorted(f"req-{i}" for i in range(8))
    assert set(df["model"]) == {"kimi-k2.6"}  # the job's model, not the file's gpt-4o-mini


def test_messages_column_multi_turn_with_tool_call_written_back(tmp_path: Path, simulator) -> None:
    h = simulator()
    job = batchkimi.load_job(ROOT / "jobs/tools.toml", {"base_url": h.base_url, "output": str(tmp_path / "out")})
    summary = batchkimi.run(job)
    df = batchkimi.read_results(job.output).set_index("id")
    assert summary.final_status == {"ok": 3}
    assert df.loc["c1", "content"].startswith("Based on the tool result")  # answered the tool turn
    calls = json.loads(df.loc["c3", "tool_calls"])  # a fresh question calls the tool
    assert calls[0]["function"]["name"] == "get_weather" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert df.loc["c3", "finish_reason"] == "tool_calls"


def test_bad_rows_become_invalid_rows_naming_line_and_column(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "fine"}, '{"id": "b", "text": ', {"id": "c", "other": 1},
                                               {"id": "d", "messages": []}, [1, 2],
                                               {"id": "f", "messages": [{"role": "user", "content": "q"},
                                                                        {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": ["oops"]}]}])
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template="Say: {text}")
    summary = batchkimi.run(job)
    df = batchkimi.read_results(job.output).set_index("row")
    assert summary.exit_code == 3 and summary.final_status == {"ok": 1, "invalid": 5}
    assert "messages[1].tool_calls must be a list" in df.loc[5, "error_message"]
    assert "line 2 of in.jsonl is not valid JSON" in df.loc[1, "error_message"]
    assert "line 3 of in.jsonl" in df.loc[2, "error_message"] and "column 'text'" in df.loc[2, "error_message"]
    assert "'messages'" in df.loc[3, "error_message"]
    assert "line 5 of in.jsonl is an array, not a JSON object" in df.loc[4, "error_message"]


def test_failed_rows_are_rows_and_rerun_retries_only_them(tmp_path: Path, simulator) -> None:
    """A 400 is not retried in the run nor by a plain rerun; --retry refused sends only that row, one row per id."""
    h = simulator()
    rows = reviews(10)
    rows[3]["text"] = "broken [[sim:400*1]]"
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE)
    first = batchkimi.run(job)
    assert first.exit_code == 3 and first.final_status == {"ok": 9, "error": 1}
    err = batchkimi.read_results(job.output).set_index("id").loc["r3"]
    assert (err["status"], err["http_status"], err["error_type"], err["attempts"]) == ("error", 400, "invalid_request_error", 1)
    served_before = h.simulator.stats["requests"]
    plain = batchkimi.run(job)  # a deterministic refusal is final for a plain rerun
    assert plain.sent_rows == 0 and plain.exit_code == 3 and h.simulator.stats["requests"] == served_before
    second = batchkimi.run(job.replace(retry=("refused",)))
    assert second.exit_code == 0 and second.run_status == {"ok": 1} and second.already_done == 9
    assert h.simulator.stats["requests"] == served_before + 1
    df = pd.read_parquet(job.output)
    assert len(df) == 10 and df["id"].is_unique and (df["status"] == "ok").all()
    third = batchkimi.run(job)
    assert third.sent_rows == 0 and h.simulator.stats["requests"] == served_before + 1


def test_a_rerun_resends_transient_failures_and_leaves_refusals(tmp_path: Path, simulator) -> None:
    """A row that ran out of attempts on 5xx is sent again by a plain rerun; a 400 row is not."""
    h = simulator()
    rows = reviews(4)
    rows[0]["text"] = "x [[sim:400]]"
    rows[1]["text"] = "y [[sim:500*2]]"
    job = fast_job(tmp_path, h.base_url, input=str(write_jsonl(tmp_path / "in.jsonl", rows)), prompt_template=TEMPLATE,
                   max_attempts=2)
    assert batchkimi.run(job).final_status == {"ok": 2, "error": 2}
    served = h.simulator.stats["requests"]
    again = batchkimi.run(job)
    assert again.sent_rows == 1 and again.final_status == {"ok": 3, "error": 1}
    assert h.simulator.stats["requests"] == served + 1
    assert batchkimi.run(job.replace(retry=("errors",))).sent_rows == 1


def test_retried_faults_recover_within_the_run(tmp_path: Path, simulator) -> None:
    h = simulator()
    texts = ["a [[sim:500*2]]", "b [[sim:502*1]]", "c [[sim:overload*1]]", "d [[sim:cut*1]]", "e [[sim:html*1]]", "f [[sim:error_event*1]]", "g [[sim:nodone*1]]"]
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "prompt": t} for i, t in enumerate(texts)])
    summary = batchkimi.run(fast_job(tmp_path, h.base_url, input=str(data)))
    df = batchkimi.read_results(tmp_path / "out")
    assert summary.final_status == {"ok": 7}
    assert sorted(df["attempts"]) == [2, 2, 2, 2, 2, 2, 3]


def test_limit_then_full_run_resumes(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", reviews(20))
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE)
    assert batchkimi.run(job.replace(limit=5)).final_status == {"ok": 5}
    full = batchkimi.run(job)
    assert full.already_done == 5 and full.run_status == {"ok": 15}
    assert len(batchkimi.read_results(job.output)) == 20


def test_resume_with_a_changed_job_is_refused_saying_what_changed(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", reviews(3))
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE)
    batchkimi.run(job)
    with pytest.raises(OutputError, match=r"model: 'kimi-k2.6' -> 'kimi-k2.5'.*--overwrite"):
        batchkimi.run(job.replace(model="kimi-k2.5"))
    batchkimi.run(job.replace(concurrency=2, rpm=100))  # limits do not change the requests
    fresh = batchkimi.run(job.replace(model="kimi-k2.5"), overwrite=True)
    assert fresh.final_status == {"ok": 3} and fresh.already_done == 0


def test_resume_against_a_changed_input_is_refused(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", reviews(3))
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE)
    batchkimi.run(job)
    changed = reviews(4)
    changed[1]["text"] = "an edited review"
    write_jsonl(data, changed)  # grown, and an old row edited: its old answer would be filed under it
    with pytest.raises(OutputError, match="input changed since .*: its data row 2"):
        batchkimi.run(job)


def test_duplicate_ids_refused_before_anything_is_sent(tmp_path: Path, simulator) -> None:
    h = simulator()
    rows = reviews(6)
    rows[4]["id"] = "r1"
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(DatasetError, match=r"'r1' at line 2 of in.jsonl, line 5 of in.jsonl"):
        batchkimi.run(fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE))
    assert h.simulator.stats["requests"] == 0


def test_missing_key_stops_before_reading_the_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENHUB_API_KEY")
    job = fast_job(tmp_path, "https://example.invalid/v1", input=str(tmp_path / "does-not-exist.jsonl"))
    with pytest.raises(MissingKeyError, match="set the environment variable TOKENHUB_API_KEY"):
        batchkimi.run(job)


def test_key_from_a_file_and_never_written_anywhere(tmp_path: Path, simulator, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """The key reaches the server, and appears in no output file, log line or error."""
    secret = "sk-file-key-never-print-me-42"
    (tmp_path / "key").write_text(secret + "\n")
    monkeypatch.delenv("TOKENHUB_API_KEY")
    h = simulator(api_keys=[secret])
    rows = reviews(3) + [{"id": "bad", "text": "x [[sim:401]]"}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE, api_key_file=str(tmp_path / "key"), concurrency=1)
    summary = batchkimi.run(job)
    assert summary.fatal and "401" in summary.fatal and secret not in summary.fatal
    out = capfd.readouterr()
    assert secret not in out.out + out.err
    for f in Path(job.output).rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in repr(job) and secret not in json.dumps(job.public_dict())


def test_401_stops_the_job_early_and_the_run_resumes(tmp_path: Path, simulator) -> None:
    h = simulator(api_keys=["sk-good"])
    data = write_jsonl(tmp_path / "in.jsonl", reviews(50))
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE, concurrency=2, api_key_env="BK_TEST_KEY")
    os.environ["BK_TEST_KEY"] = "sk-bad"
    try:
        summary = batchkimi.run(job)
        assert summary.exit_code == 1 and "authentication_error" in summary.fatal
        assert h.simulator.stats["requests"] <= 4  # stopped early, not 50 failures
        os.environ["BK_TEST_KEY"] = "sk-good"
        again = batchkimi.run(job)
        assert again.exit_code == 0 and again.final_status == {"ok": 50}
    finally:
        del os.environ["BK_TEST_KEY"]


def test_quota_exhausted_402_stops_the_job(tmp_path: Path, simulator) -> None:
    h = simulator()
    rows = reviews(30)
    rows[0]["text"] = "x [[sim:402]]"
    job = fast_job(tmp_path, h.base_url, input=str(write_jsonl(tmp_path / "in.jsonl", rows)), prompt_template=TEMPLATE, concurrency=1)
    summary = batchkimi.run(job)
    assert summary.exit_code == 1 and "FREE_QUOTA_EXHAUSTED" in summary.fatal
    assert summary.pending_rows > 0


def test_truncated_answer_has_its_own_status(tmp_path: Path, simulator) -> None:
    h = simulator(reasoning_words=300)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Explain tides"}])
    summary = batchkimi.run(fast_job(tmp_path, h.base_url, input=str(data), max_tokens=30))
    row = batchkimi.read_results(tmp_path / "out").iloc[0]
    assert summary.exit_code == 3
    assert (row["status"], row["finish_reason"], row["content"], row["error_type"]) == ("truncated", "length", "", "reasoning_exhausted_budget")
    assert "raise max_tokens" in row["error_message"]


def test_output_not_writable_is_a_job_error(tmp_path: Path, simulator) -> None:
    h = simulator()
    (tmp_path / "file").write_text("x")
    data = write_jsonl(tmp_path / "in.jsonl", reviews(2))
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE, output=str(tmp_path / "file" / "out"))
    with pytest.raises(OutputError, match="cannot create the output directory"):
        batchkimi.run(job)


def test_kimi_rule_violations_fail_before_sending() -> None:
    with pytest.raises(ConfigError, match="only 1 is allowed"):
        batchkimi.load_job(None, {"temperature": 0.3})
    with pytest.raises(ConfigError, match="only 0.6 is allowed"):
        batchkimi.load_job(None, {"temperature": 0.3, "thinking": "disabled"})
    with pytest.raises(ConfigError, match="incompatible with thinking enabled"):
        batchkimi.load_job(None, {"tool_choice": "required"})
    with pytest.raises(ConfigError, match="top_p"):
        batchkimi.load_job(None, {"top_p": 0.5})
    assert batchkimi.load_job(None, {"temperature": 0.6, "thinking": "disabled", "tool_choice": "required"}).temperature == 0.6


def test_library_row_engine_runs_inside_another_schedulers_worker(tmp_path: Path, simulator) -> None:
    """RowEngine is the per-row path a Ray actor would use: same code, no second path."""
    import asyncio

    from batchkimi.request import build_request

    h = simulator()
    job = batchkimi.Job(base_url=h.base_url, prompt_template="{q}", thinking="disabled", stream=False)

    async def actor() -> list[dict]:
        async with batchkimi.RowEngine.create(job, "sk-any") as engine:
            return list(await asyncio.gather(*(engine.process(f"q{i}", i, build_request({"q": f"What is {i} + {i}?"}, job)) for i in range(5))))

    rows = asyncio.run(actor())
    assert [r["status"] for r in rows] == ["ok"] * 5 and all(r["content"] for r in rows)


def test_stop_ends_the_run_while_workers_wait_in_the_limiter(tmp_path: Path, simulator) -> None:
    """A stop with a full work queue and every worker blocked on the limiter still returns, within the grace."""
    import asyncio
    import time

    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "prompt": "x"} for i in range(500)])
    job = fast_job(tmp_path, h.base_url, input=str(data), rpm=6, concurrency=4, grace_s=0.5)

    async def go() -> tuple[float, batchkimi.Summary]:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        t0 = time.monotonic()
        summary = await asyncio.wait_for(batchkimi.run_async(job, stop=stop), 30)
        return time.monotonic() - t0, summary

    elapsed, summary = asyncio.run(go())
    assert elapsed < 10 and summary.final_status.get("ok", 0) >= 1 and summary.pending_rows > 0


def test_a_directory_batchkimi_did_not_make_is_never_written_or_deleted(tmp_path: Path, simulator) -> None:
    h = simulator()
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    data = write_jsonl(tmp_path / "in.jsonl", reviews(2))
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE, output=str(precious))
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not a batchkimi output"):
            batchkimi.run(job, overwrite=overwrite)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert h.simulator.stats["requests"] == 0


@pytest.mark.parametrize("unknown_model_status", [404, 400])
def test_an_unknown_model_stops_the_job_at_once(tmp_path: Path, simulator, unknown_model_status: int) -> None:
    """Moonshot's 404 or TokenHub's 400 for a wrong model: one request, not one failure per row."""
    h = simulator(unknown_model_status=unknown_model_status)
    data = write_jsonl(tmp_path / "in.jsonl", reviews(40))
    summary = batchkimi.run(fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE, model="kimi-k9", concurrency=1))
    assert summary.exit_code == 1 and "kimi-k9" in summary.fatal
    assert h.simulator.stats["requests"] == 1


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(tmp_path: Path, simulator) -> None:
    """One writer per output: a cron overlap must not interleave two runs' parts."""
    import threading
    import time

    h = simulator(latency_ms=300)
    data = write_jsonl(tmp_path / "in.jsonl", reviews(30))
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template=TEMPLATE, concurrency=2)
    first: dict = {}
    t = threading.Thread(target=lambda: first.setdefault("summary", batchkimi.run(job)))
    t.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "out" / "_manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(OutputError, match=r"being written by another batchkimi run \(pid \d+\)"):
        batchkimi.run(job)
    t.join(60)
    assert first["summary"].final_status == {"ok": 30}
    assert batchkimi.run(job).sent_rows == 0  # the lock is gone with the first run
