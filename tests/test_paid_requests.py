"""What a run pays for (issue "Every request worth its price"): every test counts the requests
a loopback server received, on the first run and on a rerun of the same command."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import batchkimi
from batchkimi.config import load_job

from .conftest import chunk, fast_job, json_reply, sse, stream_reply, write_jsonl

USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def completion(message: dict[str, Any], finish: Any = "stop", usage: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "kimi-k2.6",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": USAGE if usage is None else usage}


def rows(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"question {i}", **extra} for i in range(n)]


def run(job: Any) -> batchkimi.Summary:
    async def go() -> batchkimi.Summary:
        return await asyncio.wait_for(batchkimi.run_async(job), 60)

    return asyncio.run(go())


# ---- 1: a complete answer with an odd accounting field is kept, not bought again ----

ODD = [
    pytest.param(completion({"content": "yes", "reasoning_content": "r"}, usage={"prompt_tokens": "9", "completion_tokens": "4"}),
                 "usage.prompt_tokens was the text '9'", 9, id="usage-as-text"),
    pytest.param(completion({"content": "yes", "reasoning_content": "r"}, finish=3), "finish_reason was a number", 9,
                 id="finish-reason-a-number"),
    pytest.param(completion({"content": "yes", "reasoning_content": 42}), "reasoning_content was a number", 9,
                 id="reasoning-a-number"),
    pytest.param(completion({"content": "yes"}, usage={"prompt_tokens": 9, "completion_tokens": [4]}),
                 "completion_tokens was an array", 9, id="count-an-array"),
]


@pytest.mark.parametrize("body,warning,prompt_tokens", ODD)
def test_a_whole_answer_with_an_odd_field_is_kept_once_with_a_warning(tmp_path: Path, raw_server, body: Any,
                                                                       warning: str, prompt_tokens: int) -> None:
    """60 rows, max_attempts 3: 60 paid requests (not 180), every answer kept, the oddity said per row."""
    srv = raw_server(json_reply(body))
    data = write_jsonl(tmp_path / "in.jsonl", rows(60))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_attempts=3, max_tokens=20000)
    assert run(job).final_status == {"ok": 60}
    assert len(srv.requests) == 60
    df = batchkimi.read_results(job.output)
    assert (df["content"] == "yes").all() and (df["prompt_tokens"] == prompt_tokens).all()
    assert df["warnings"].str.contains(warning, regex=False).all(), df["warnings"][0]
    assert run(job).final_status == {"ok": 60} and len(srv.requests) == 60  # a rerun buys nothing


def test_a_streamed_answer_with_string_usage_is_kept_with_its_counts(tmp_path: Path, raw_server) -> None:
    raw = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "yes"}),
              chunk({}, "stop", {"prompt_tokens": "9", "completion_tokens": "4", "total_tokens": "13"}))
    srv = raw_server(stream_reply(raw))
    data = write_jsonl(tmp_path / "in.jsonl", rows(10))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=True, max_tokens=20000)
    assert run(job).final_status == {"ok": 10} and len(srv.requests) == 10
    df = batchkimi.read_results(job.output)
    assert (df["total_tokens"] == 13).all() and df["warnings"].notna().all()


def test_an_unusable_answer_is_tried_twice_at_most(tmp_path: Path, raw_server) -> None:
    """A 200 whose text is unusable (content a number) is paid for twice per row, not max_attempts times."""
    srv = raw_server(json_reply(completion({"content": 42})))
    data = write_jsonl(tmp_path / "in.jsonl", rows(20))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_attempts=6, max_tokens=20000)
    assert run(job).final_status == {"error": 20}
    assert len(srv.requests) == 40


# ---- 16: the same answer streamed or not ----

def test_streamed_tool_arguments_sent_as_objects_are_the_arguments_not_a_concatenation(tmp_path: Path, raw_server) -> None:
    """A proxy re-sending the whole arguments object with each delta: the answer is one object, as unstreamed."""
    call = {"index": 0, "id": "functions.w:0", "type": "function", "function": {"name": "w", "arguments": {"city": "Beijing"}}}
    again = {"index": 0, "function": {"arguments": {"city": "Beijing"}}}
    raw = sse(chunk({"role": "assistant", "content": ""}), chunk({"tool_calls": [call]}), chunk({"tool_calls": [again]}),
              chunk({"tool_calls": [again]}), chunk({}, "tool_calls", USAGE))
    srv = raw_server(stream_reply(raw))
    data = write_jsonl(tmp_path / "in.jsonl", rows(3))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=True, max_tokens=20000)
    assert run(job).final_status == {"ok": 3}
    calls = json.loads(batchkimi.read_results(job.output)["tool_calls"][0])
    assert calls[0]["function"]["arguments"] == '{"city":"Beijing"}'


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_reply_with_no_text_and_no_tool_call_is_no_answer(tmp_path: Path, raw_server, stream: bool) -> None:
    if stream:
        nulls = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None}
        srv = raw_server(stream_reply(sse(chunk(nulls), chunk(nulls), chunk({}, "stop", USAGE))))
    else:
        srv = raw_server(json_reply(completion({"content": None})))
    data = write_jsonl(tmp_path / "in.jsonl", rows(5))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=stream, max_tokens=20000)
    assert run(job).final_status == {"error": 5}
    df = batchkimi.read_results(job.output)
    assert (df["error_type"] == "empty_answer").all()
    assert len(srv.requests) == 10


# ---- 2, 3: a rerun re-sends what can succeed next time, and nothing else unasked ----

class Budgeted:
    """Answers whole when max_tokens >= 4000, else cuts the reasoning at max_tokens (content empty)."""

    def __init__(self) -> None:
        self.max_tokens: list[int] = []

    async def __call__(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        mt = body.get("max_tokens")
        self.max_tokens.append(mt)
        if mt is not None and mt < 4000:
            doc = completion({"content": "", "reasoning_content": "long thought"}, finish="length",
                             usage={"prompt_tokens": 9, "completion_tokens": mt, "total_tokens": 9 + mt})
        else:
            doc = completion({"content": "yes", "reasoning_content": "thought"})
        return web.Response(body=json.dumps(doc).encode(), content_type="application/json")


def test_truncated_rows_are_final_for_their_budget_and_sent_again_with_a_larger_one(tmp_path: Path, raw_server) -> None:
    server = Budgeted()
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", rows(10))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_tokens=1000)
    assert run(job).final_status == {"truncated": 10} and len(srv.requests) == 10
    df = batchkimi.read_results(job.output)
    assert (df["max_tokens"] == 1000).all() and (df["error_type"] == "reasoning_exhausted_budget").all()
    again = run(job)  # the same budget would truncate again: nothing is sent
    assert again.sent_rows == 0 and len(srv.requests) == 10
    raised = run(job.replace(max_tokens=8000))  # accepted on the same output; exactly the truncated rows
    assert raised.final_status == {"ok": 10} and len(srv.requests) == 20
    assert server.max_tokens[10:] == [8000] * 10
    assert (batchkimi.read_results(job.output)["max_tokens"] == 8000).all()


def test_retry_truncated_resends_at_the_same_budget_on_request(tmp_path: Path, raw_server) -> None:
    srv = raw_server(Budgeted())
    data = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_tokens=1000)
    run(job)
    assert run(job.replace(retry=("truncated",))).sent_rows == 4 and len(srv.requests) == 8


def test_a_batch_line_truncated_at_its_own_budget_is_not_resent_when_the_job_budget_rises(tmp_path: Path, raw_server) -> None:
    srv = raw_server(Budgeted())
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 1000}} for i in range(3)]
    data = write_jsonl(tmp_path / "batch.jsonl", lines)
    job = fast_job(tmp_path, srv.base_url, input=str(data), input_format="openai_batch", stream=False, max_tokens=2000)
    assert run(job).final_status == {"truncated": 3}
    assert run(job.replace(max_tokens=9000)).sent_rows == 0 and len(srv.requests) == 3


def by_marker(request_body: dict[str, Any]) -> str:
    return request_body["messages"][-1]["content"]


class Refuser:
    """Each row's prompt names the status it gets: 'question 400' is refused with a 400..."""

    async def __call__(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        status = int(by_marker(body).split()[-1])
        if status == 200:
            return web.Response(body=json.dumps(completion({"content": "yes"})).encode(), content_type="application/json")
        err = {"error": {"type": "invalid_request_error" if status < 500 else "server_error", "message": f"status {status}"}}
        return web.Response(status=status, body=json.dumps(err).encode(), content_type="application/json")


def test_refusals_are_final_and_transient_failures_are_resent(tmp_path: Path, raw_server) -> None:
    """400, 413, 451 and a context-window 400 cost one request each, ever; a 503 row is sent again by a plain rerun."""
    srv = raw_server(Refuser())
    statuses = [400, 413, 451, 422, 503, 200]
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"s{s}", "prompt": f"question {s}"} for s in statuses])
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_attempts=2, max_tokens=20000,
                   stop_after_failures=0)
    assert run(job).final_status == {"error": 5, "ok": 1}
    first = len(srv.requests)
    assert first == 4 + 2 + 1  # 503 tried twice in the run
    again = run(job)
    assert again.sent_rows == 1 and len(srv.requests) == first + 2  # only the 503 row, with its retries
    asked = run(job.replace(retry=("refused",)))
    assert asked.sent_rows == 5  # the four refusals and the transient row
    assert len(srv.requests) == first + 2 + 4 + 2


def test_the_retry_flag_takes_a_list_and_refuses_a_bad_word(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchkimi.cli import cli

    data = write_jsonl(tmp_path / "in.jsonl", rows(2))
    res = CliRunner().invoke(cli, ["run", "--input", str(data), "--output", str(tmp_path / "o"), "--base-url", "simulator",
                                   "--retry", "refused,sometimes", "--dry-run"])
    assert res.exit_code == 1 and "'sometimes' is not one of truncated, refused, errors, all" in res.output
    job = load_job(None, {"retry": "truncated,refused", "input": str(data)})
    assert job.retry == ("truncated", "refused")


# ---- 4, 5, 13, 14, 17: what can never succeed is refused before it is sent ----

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "sample_data" / "media" / "images"


def test_a_prompt_over_the_context_window_is_refused_before_sending(tmp_path: Path, simulator) -> None:
    """A 2 MB line (about 500k tokens) and a prompt that only fits without max_tokens: invalid rows, no request."""
    h = simulator()
    big = "word " * 400_000
    medium = "word " * 260_000  # ~325k tokens estimated (kept generous: 3/4 of it): fits alone, never with 32k more
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "big", "prompt": big}, {"id": "mid", "prompt": medium},
                                               {"id": "ok", "prompt": "short"}])
    job = fast_job(tmp_path, h.base_url, input=str(data), max_tokens=32768)
    report = batchkimi.api.dry_run(job)
    assert report.status == {"invalid": 2, "to_send": 1}
    assert any("context window of 262,144" in line for line in report.invalid_examples)
    assert run(job).final_status == {"invalid": 2, "ok": 1}
    assert h.simulator.stats["requests"] == 1
    df = batchkimi.read_results(job.output).set_index("id")
    assert "about 500,0" in df.loc["big", "error_message"] and "over Kimi's context window" in df.loc["big", "error_message"]
    assert "plus max_tokens (32,768)" in df.loc["mid", "error_message"]


def test_a_truncated_jpeg_is_refused_before_sending_and_a_whole_one_is_sent(tmp_path: Path, simulator) -> None:
    h = simulator()
    whole = (IMAGES / "square.jpg").read_bytes()
    (tmp_path / "whole.jpg").write_bytes(whole)
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "motion.jpg").write_bytes(whole + b"\0" * 4096 + b"ftypmp42" + b"x" * 4096)  # data after the end
    png = (IMAGES / "circle.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    webp = (IMAGES / "triangle.webp").read_bytes()
    (tmp_path / "cut.webp").write_bytes(webp[: len(webp) // 2])
    names = ["whole.jpg", "cut.jpg", "motion.jpg", "cut.png", "cut.webp"]
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": n, "prompt": "describe", "image": n} for n in names])
    job = fast_job(tmp_path, h.base_url, input=str(data), thinking="disabled")
    assert run(job).final_status == {"ok": 2, "invalid": 3}
    assert h.simulator.stats["requests"] == 2
    df = batchkimi.read_results(job.output).set_index("id")
    assert df.loc["cut.jpg", "status"] == "invalid" and "damaged JPEG" in df.loc["cut.jpg", "error_message"]
    assert df.loc["motion.jpg", "status"] == "ok"


@pytest.mark.parametrize("label,source,sent", [
    ("video/quicktime", "videos/clip.mov", "video/mov"),
    ("application/octet-stream", "images/circle.png", "image/png"),
    ("image/bmp", "images/circle.png", "image/png"),
    ("image/jpeg", "images/circle.png", "image/png"),
], ids=["quicktime", "octet-stream", "bmp-label-on-png", "jpeg-label-on-png"])
def test_a_data_url_goes_out_under_the_type_its_bytes_are(tmp_path: Path, raw_server, label: str, source: str, sent: str) -> None:
    import base64

    srv = raw_server(json_reply(completion({"content": "a caption"})))
    raw = (ROOT / "sample_data" / "media" / source).read_bytes()
    url = f"data:{label};base64,{base64.b64encode(raw).decode()}"
    column = "video" if sent.startswith("video") else "image"
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "describe", column: url}])
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, thinking="disabled")
    assert run(job).final_status == {"ok": 1}
    part = srv.requests[0]["body"]["messages"][-1]["content"][1]
    assert part[f"{column}_url"]["url"].startswith(f"data:{sent};base64,")


def test_a_data_url_of_a_type_kimi_cannot_take_is_refused_before_sending(tmp_path: Path, raw_server) -> None:
    import base64
    import io as _io

    from PIL import Image

    buf = _io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="BMP")
    srv = raw_server(json_reply(completion({"content": "a caption"})))
    url = f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "describe", "image": url}])
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, thinking="disabled")
    assert run(job).final_status == {"invalid": 1} and srv.requests == []


def batch_line(i: int, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": f"q{i}"}], **body}}


def test_openai_batch_lines_with_harmless_keys_are_sent_without_them(tmp_path: Path, raw_server) -> None:
    srv = raw_server(json_reply(completion({"content": "yes"})))
    harmless = {"parallel_tool_calls": False, "store": True, "metadata": {"team": "x"}, "reasoning_effort": "high"}
    lines = [batch_line(0, **harmless), batch_line(1, max_completion_tokens=20000)]
    bad = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x", "model": "m"}}
    data = write_jsonl(tmp_path / "batch.jsonl", [*lines, bad])
    job = fast_job(tmp_path, srv.base_url, input=str(data), input_format="openai_batch", stream=False, max_tokens=32768)
    assert run(job).final_status == {"ok": 2, "invalid": 1}
    bodies = {r["body"]["messages"][0]["content"]: r["body"] for r in srv.requests}
    assert not set(harmless) & set(bodies["q0"])
    assert bodies["q1"]["max_tokens"] == 20000 and "max_completion_tokens" not in bodies["q1"]
    err = batchkimi.read_results(job.output).set_index("id").loc["e", "error_message"]
    assert "'url' is '/v1/embeddings'" in err


def test_a_thinking_budget_under_the_floor_is_warned_once_naming_its_source(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchkimi.cli import cli

    lines = [batch_line(i, max_tokens=300) for i in range(3)]
    data = write_jsonl(tmp_path / "batch.jsonl", lines)
    res = CliRunner().invoke(cli, ["run", "--input", str(data), "--output",
                                   str(tmp_path / "o"), "--base-url", "simulator", "--max-tokens", "2048", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "the job sets max_tokens = 2,048 with thinking on" in res.output
    assert "the OpenAI batch line at" in res.output and "(3 such lines in all)" in res.output
    for shipped in ("demo", "nightly_eval"):
        job = load_job(ROOT / "jobs" / f"{shipped}.toml")
        assert job.effective_max_tokens >= 16000, shipped


# ---- 10, 15: endpoint ids ----

def test_an_endpoint_id_takes_the_rules_and_prices_of_the_model_it_serves(tmp_path: Path, simulator) -> None:
    h = simulator(endpoints={"ep-7f3a9": "kimi-k2.6"})
    video = ROOT / "sample_data" / "media" / "videos" / "clip.mp4"
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "v", "prompt": "describe", "video": str(video)}])
    job = fast_job(tmp_path, h.base_url, input=str(data), model="ep-7f3a9", ep_model="kimi-k2.6",
                   media_root=str(video.parent), thinking="disabled", max_cost_usd=1.0, max_tokens=1000)
    summary = run(job)
    assert summary.final_status == {"ok": 1}
    df = batchkimi.read_results(job.output)
    prompt, completion_tokens = int(df["prompt_tokens"][0]), int(df["completion_tokens"][0])
    miss, hit, out = 0.95, 0.16, 4.00
    cached = int(df["cached_tokens"][0] or 0)
    assert df["cost_usd"][0] == pytest.approx(((prompt - cached) * miss + cached * hit + completion_tokens * out) / 1e6)


def test_a_budget_for_an_unpriced_endpoint_id_is_refused_naming_the_keys(tmp_path: Path) -> None:
    from batchkimi.errors import ConfigError

    with pytest.raises(ConfigError, match="ep_model"):
        load_job(None, {"model": "ep-1234", "max_cost_usd": 1.0, "base_url": "simulator"})
    priced = load_job(None, {"model": "ep-1234", "max_cost_usd": 1.0, "base_url": "simulator", "ep_model": "kimi-k2.5"})
    assert priced.price_table["ep-1234"] == (0.60, 0.10, 3.00)


# ---- 6, 7: the same job resumes whatever door and however its input grew ----

def test_an_input_that_only_grew_resumes_and_sends_only_the_new_rows(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", rows(30))
    job = fast_job(tmp_path, h.base_url, input=str(data), thinking="disabled")
    assert run(job).final_status == {"ok": 30} and h.simulator.stats["requests"] == 30
    with open(data, "a", encoding="utf-8") as fh:
        for i in range(30, 50):
            fh.write(json.dumps({"id": f"r{i}", "prompt": f"question {i}"}) + "\n")
    grown = run(job)
    assert grown.sent_rows == 20 and grown.final_status == {"ok": 50} and h.simulator.stats["requests"] == 50
    assert run(job).sent_rows == 0  # and the grown input is the one remembered now
    lines = data.read_text().splitlines()
    lines[7] = json.dumps({"id": "r7", "prompt": "a different question"})
    data.write_text("\n".join(lines) + "\n")
    from batchkimi.errors import OutputError

    with pytest.raises(OutputError, match="data row 8"):
        run(job)
    assert h.simulator.stats["requests"] == 50


def test_a_parquet_folder_with_a_new_file_resumes_and_a_changed_file_is_named(tmp_path: Path, simulator) -> None:
    import pandas as pd

    h = simulator()
    folder = tmp_path / "shards"
    folder.mkdir()
    pd.DataFrame(rows(10)).to_parquet(folder / "part-0.parquet")
    job = fast_job(tmp_path, h.base_url, input=str(folder), thinking="disabled")
    assert run(job).final_status == {"ok": 10}
    pd.DataFrame([{"id": f"n{i}", "prompt": f"new {i}"} for i in range(5)]).to_parquet(folder / "part-1.parquet")
    assert run(job).sent_rows == 5 and h.simulator.stats["requests"] == 15
    pd.DataFrame(rows(9)).to_parquet(folder / "part-0.parquet")
    from batchkimi.errors import OutputError

    with pytest.raises(OutputError, match="part-0.parquet changed"):
        run(job)


def test_the_caption_job_file_and_the_caption_command_are_one_job(tmp_path: Path, monkeypatch) -> None:
    """`batchkimi run jobs/caption.toml`, then the README's `batchkimi caption ...` on the same output: nothing re-sent."""
    import shutil

    from click.testing import CliRunner

    from batchkimi.cli import cli

    media = tmp_path / "media"
    shutil.copytree(ROOT / "sample_data" / "media", media)
    job_file = tmp_path / "jobs" / "caption.toml"
    job_file.parent.mkdir()
    job_file.write_text((ROOT / "jobs" / "caption.toml").read_text().replace("../sample_data/media", "../media"))
    first = CliRunner().invoke(cli, ["run", str(job_file), "--quiet"])
    assert first.exit_code in (0, 3), first.output
    monkeypatch.chdir(tmp_path)
    second = CliRunner().invoke(cli, ["caption", "media", "--output", "runs/caption", "--base-url", "simulator",
                                      "--no-thinking", "--max-tokens", "512", "--max-image-side", "2048", "--exclude", "*.py",
                                      "--prompt", "Describe this image or video in one sentence.", "--quiet", "--json-summary"])
    assert second.exit_code in (0, 3), second.output
    summary = json.loads(second.output.splitlines()[0])
    assert summary["run_status"] == {} and summary["already_done"] > 0


# ---- 8, 9: a budget is a ceiling, for the whole output ----

class Thinker:
    """Answers after a short wait with a thinking-length usage: 6,000 of the 8,000 tokens allowed."""

    def __init__(self, completion_tokens: int = 6000) -> None:
        self.completion_tokens = completion_tokens
        self.usages: list[dict[str, int]] = []

    async def __call__(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)
        usage = {"prompt_tokens": 100, "completion_tokens": self.completion_tokens,
                 "total_tokens": 100 + self.completion_tokens}
        self.usages.append(usage)
        doc = completion({"content": "yes", "reasoning_content": "long thought"}, usage=usage)
        return web.Response(body=json.dumps(doc).encode(), content_type="application/json")

    def billed_usd(self) -> float:
        """What the server billed, at kimi-k2.6's list prices: an independent count of the spend."""
        return sum(u["prompt_tokens"] * 0.95 + u["completion_tokens"] * 4.00 for u in self.usages) / 1e6


def test_a_cost_budget_is_never_passed_and_mostly_used(tmp_path: Path, raw_server) -> None:
    server = Thinker()
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", rows(100))
    budget = 0.20
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_tokens=8000, concurrency=32,
                   max_cost_usd=budget)
    summary = run(job)
    assert summary.exit_code == 4 and summary.budget_stop
    worst = (int(12 * 1.25) + 1) * 0.95e-6 + 8000 * 4e-6  # one request's worst case
    assert budget - worst <= server.billed_usd() <= budget
    assert summary.cost_usd == pytest.approx(server.billed_usd())
    assert any("of $0.2 spent by this output" in line for line in summary.lines())


def test_a_token_budget_is_never_passed(tmp_path: Path, raw_server) -> None:
    server = Thinker()
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", rows(100))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_tokens=8000, max_total_tokens=100_000)
    assert run(job).exit_code == 4
    used = sum(u["total_tokens"] for u in server.usages)
    assert 100_000 - 8016 <= used <= 100_000


def test_the_budget_covers_every_run_of_the_output(tmp_path: Path, raw_server) -> None:
    """Three runs with --max-cost 0.05: together they spend at most $0.05, and the run at the cap sends nothing."""
    server = Thinker(completion_tokens=2000)
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", rows(100))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_tokens=3000, max_cost_usd=0.05)
    codes = [run(job).exit_code for _ in range(3)]
    assert codes == [4, 4, 4]
    assert server.billed_usd() <= 0.05
    sent = len(srv.requests)
    last = run(job)
    assert len(srv.requests) == sent and last.exit_code == 4 and last.requests == 0


def test_a_budget_counts_the_spend_of_a_killed_run(tmp_path: Path, raw_server) -> None:
    """A run that never recorded its spend (killed): its parts are counted by the next run."""
    server = Thinker(completion_tokens=2000)
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", rows(20))
    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_tokens=3000, limit=5)
    run(job)
    manifest_path = Path(job.output) / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["spend"]  # as a run killed before it wrote its spend leaves it
    manifest_path.write_text(json.dumps(manifest))
    spent = server.billed_usd()
    capped = run(job.replace(limit=None, max_cost_usd=spent + 0.0125))
    assert server.billed_usd() <= spent + 0.0125 and capped.exit_code == 4


# ---- 11, 12: a quota waits visibly or stops resumably; a short Retry-After paces one request ----

class Quota:
    """Rows whose prompt ends in 'quota' get a daily-quota 429 (Retry-After 1800) until ``open``."""

    def __init__(self, retry_after: str = "1800") -> None:
        self.open = False
        self.retry_after = retry_after

    async def __call__(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        if not self.open and by_marker(body).endswith("quota"):
            err = {"error": {"message": "Your account org-1<ak-1> request reached organization TPD rate limit, "
                                        "current:1507272, limit:1500000", "type": "rate_limit_reached_error"}}
            return web.Response(status=429, body=json.dumps(err).encode(), content_type="application/json",
                                headers={"Retry-After": self.retry_after})
        await asyncio.sleep(0.05)
        return web.Response(body=json.dumps(completion({"content": "yes"})).encode(), content_type="application/json")


def test_a_daily_quota_stops_the_run_resumably_and_no_row_becomes_an_error(tmp_path: Path, raw_server) -> None:
    from click.testing import CliRunner

    from batchkimi.cli import cli

    server = Quota()
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q{i} " + ("quota" if i % 5 == 4 else "fine")}
                                               for i in range(30)])
    args = ["run", "--input", str(data), "--output", str(tmp_path / "out"), "--base-url", srv.base_url,
            "--no-stream", "--concurrency", "3", "--max-tokens", "20000", "--quiet"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 6, res.output
    assert "wait until" in res.output and "local (" in res.output and "UTC)" in res.output
    df = batchkimi.read_results(tmp_path / "out")
    assert set(df["status"]) <= {"ok"}  # nothing became an error while the account waited
    server.open = True
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert len(batchkimi.read_results(tmp_path / "out")) == 30


def test_a_wait_under_max_wait_is_taken_and_shown_as_a_countdown(tmp_path: Path, raw_server) -> None:
    from batchkimi.events import Waiting

    server = Quota(retry_after="6")
    srv = raw_server(server)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "q quota"}, {"id": "b", "prompt": "q fine"}])
    seen: list[tuple[Waiting, float]] = []

    def hook(event: Any) -> None:
        if isinstance(event, Waiting):
            seen.append((event, time.time()))
            server.open = True

    job = fast_job(tmp_path, srv.base_url, input=str(data), stream=False, max_tokens=20000)

    async def go() -> batchkimi.Summary:
        return await asyncio.wait_for(batchkimi.run_async(job, hook=hook), 60)

    assert asyncio.run(go()).final_status == {"ok": 2}
    assert len(seen) == 1
    event, at = seen[0]
    assert 5 <= event.until_epoch_s - at <= 7  # the countdown runs to the end of the 6 s wait


def test_sparse_short_retry_after_429s_pace_one_request_not_the_job(tmp_path: Path, raw_server) -> None:
    """One 429 with Retry-After 1 on each of 12 of 200 rows: the rate is never cut and each of those rows waits its second."""
    from batchkimi.execution.row import RowEngine, endpoint, limiter_of, policy_of

    seen: dict[str, int] = {}
    times: dict[str, list[float]] = {}

    async def handler(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        prompt = by_marker(body)
        seen[prompt] = seen.get(prompt, 0) + 1
        times.setdefault(prompt, []).append(asyncio.get_running_loop().time())
        if prompt.endswith("pace") and seen[prompt] == 1:
            err = {"error": {"type": "rate_limit_error", "code": "429001", "message": "rate limit exceeded on dimension: rpm"}}
            return web.Response(status=429, body=json.dumps(err).encode(), content_type="application/json",
                                headers={"Retry-After": "1"})
        await asyncio.sleep(0.01)
        return web.Response(body=json.dumps(completion({"content": "yes"})).encode(), content_type="application/json")

    srv = raw_server(handler)
    job = fast_job(tmp_path, srv.base_url, stream=False, max_tokens=20000, concurrency=50)
    from batchkimi.request import build_request

    async def go() -> tuple[Any, list[dict[str, Any]]]:
        limiter = limiter_of(job)
        async with endpoint(job, "sk-test") as transport:
            engine = RowEngine(job, transport, limiter, policy_of(job))
            sem = asyncio.Semaphore(50)

            async def one(i: int) -> dict[str, Any]:
                async with sem:
                    prompt = f"q{i} " + ("pace" if i % 17 == 3 else "fine")
                    return await engine.process(f"r{i}", i, build_request({"prompt": prompt}, job))

            return limiter, list(await asyncio.gather(*(one(i) for i in range(200))))

    limiter, results = asyncio.run(go())
    assert all(r["status"] == "ok" for r in results)
    paced = [r for r in results if r["attempts"] == 2]
    assert len(paced) == 12
    assert all(t[1] - t[0] >= 0.95 for p, t in times.items() if p.endswith("pace"))  # each waited its Retry-After
    # no cut of the shared rate and no pause of the others; the rate learns slowly (5% at most once a second)
    assert limiter.rate_limited == 12 and limiter.cuts == 0 and limiter.share >= 0.9


# ---- a request that can never fit the job's TPM limit (issue "A rehearsal that looks like Kimi", item 5) ----

def test_a_prompt_over_the_tpm_limit_is_refused_before_sending(tmp_path: Path, simulator) -> None:
    h = simulator(tpm=2000)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "big", "prompt": "word " * 4000}, {"id": "ok", "prompt": "hi"}])
    job = fast_job(tmp_path, h.base_url, input=str(data), thinking="disabled", max_tokens=64, tpm=2000)
    assert run(job).final_status == {"invalid": 1, "ok": 1}
    assert h.simulator.stats["requests"] == 1
    err = batchkimi.read_results(job.output).set_index("id").loc["big", "error_message"]
    assert "over the job's tpm limit of 2,000" in err
    assert run(job).sent_rows == 0  # and no rerun sends it


def test_the_simulator_answers_a_prompt_over_its_tpm_as_unservable_not_rate_limited(tmp_path: Path, simulator) -> None:
    """Without the client's check (no tpm in the job), the simulator says 400 once: no minute of 429s."""
    h = simulator(tpm=2000)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "big", "prompt": "word " * 4000}])
    job = fast_job(tmp_path, h.base_url, input=str(data), thinking="disabled", max_tokens=64)
    assert run(job).final_status == {"error": 1}
    assert h.simulator.stats["requests"] == 1 and dict(h.simulator.stats["by_status"]) == {400: 1}
    assert run(job).sent_rows == 0  # a refusal: a plain rerun pays nothing for it


def test_an_unknown_simulator_key_is_one_line_naming_it(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchkimi.cli import cli

    job_file = tmp_path / "job.toml"
    data = write_jsonl(tmp_path / "in.jsonl", rows(2))
    job_file.write_text(f'input = "{data}"\noutput = "{tmp_path / "o"}"\nbase_url = "simulator"\n\n[simulator]\nlatncy_ms = 5\n')
    for extra in ([], ["--dry-run"]):
        res = CliRunner().invoke(cli, ["run", str(job_file), "--quiet", *extra])
        assert res.exit_code == 1, res.output
        assert "unknown simulator setting 'latncy_ms' (did you mean 'latency_ms'?)" in res.output
        assert "Traceback" not in res.output
