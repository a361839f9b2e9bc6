"""A rehearsal that looks like Kimi: heavy-tailed lengths cut at max_tokens, time as a first
token plus a decode rate (and `speed` that compresses only time), prompt caching of any shared
prefix, `prompt_cache_key`, and history reasoning billed only with thinking.keep = "all"."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

import batchkimi
from batchkimi.config import Job
from batchkimi.kimi import ASSUMED_LENGTHS
from batchkimi.output.sink import read_results
from batchkimi.request import build_request
from batchkimi.simulator.answers import answer
from batchkimi.simulator.config import SimConfig
from batchkimi.tokens import estimate_text_tokens

from .conftest import fast_job, write_jsonl
from .test_simulator import post, user


def test_thinking_lengths_follow_the_configured_lognormal() -> None:
    """2,000 answers: the median and the 99th percentile of the reasoning's tokens are where the
    configured median and spread put them (exp(2.326 sigma) above the median for p99)."""
    shape = SimConfig().length_shape("kimi-k2.6", True)
    assert shape == ASSUMED_LENGTHS["thinking"]
    tokens = np.array([estimate_text_tokens(answer([{"role": "user", "content": f"Tell me about item {i}."}], seed=3,
                                                   thinking=True, tools=None, tool_choice=None, json_mode=False, accuracy=1.0,
                                                   reasoning_words=0, answer_words=0, bad_tool_args=False, shape=shape).reasoning)
                       for i in range(2000)])
    median, sigma = shape["reasoning_median"], shape["reasoning_sigma"]
    p50, p99 = np.percentile(tokens, [50, 99])
    assert abs(p50 / median - 1) < 0.12, p50
    assert abs(p99 / (median * math.exp(2.326 * sigma)) - 1) < 0.3, p99
    assert 0.015 < (tokens > 16_000).mean() < 0.06  # "a few percent reach 16,000"
    # per model and mode, from the table
    cfg = SimConfig.from_mapping({"lengths": {"kimi-k2.5/thinking": {"reasoning_median": 500}}})
    assert cfg.length_shape("kimi-k2.5", True)["reasoning_median"] == 500
    assert cfg.length_shape("kimi-k2.6", True)["reasoning_median"] == median


def test_long_thinking_is_cut_at_max_tokens_as_kimi_cuts_it(tmp_path: Path, simulator) -> None:
    h = simulator(shape="kimi", speed=1000, seed=2)
    rows = [{"id": f"r{i}", "prompt": f"Explain topic {i} in depth."} for i in range(40)]
    job = fast_job(tmp_path, h.base_url, input=str(write_jsonl(tmp_path / "in.jsonl", rows)), max_tokens=1024,
                   thinking="enabled", stream=True, concurrency=8)
    batchkimi.run(job)
    df = read_results(job.output)
    cut = df[df["finish_reason"] == "length"]
    assert len(cut) >= 10 and (cut["status"] == "truncated").all()
    assert (cut["completion_tokens"] <= 1024).all() and (cut["completion_tokens"] >= 1000).all()
    spent = cut[cut["content"].fillna("") == ""]  # the reasoning used the whole budget: no answer
    assert len(spent) >= 5 and (spent["completion_tokens"] == 1024).all()
    # the short shape (what the other tests use) never reaches such a budget
    short = simulator(seed=2)
    other = fast_job(tmp_path, short.base_url, input=job.input, output=str(tmp_path / "short"), max_tokens=1024)
    batchkimi.run(other)
    assert (read_results(other.output)["finish_reason"] == "stop").all()


def test_time_is_first_token_plus_decode_and_speed_compresses_only_time(simulator) -> None:
    body = user("Write about the sea.", thinking={"type": "disabled"}, max_tokens=4000)
    slow = simulator(shape="kimi", latency_ms=200, tokens_per_s=2000, seed=4)
    fast = simulator(shape="kimi", latency_ms=200, tokens_per_s=2000, seed=4, speed=10)
    t0 = time.monotonic()
    status, _, data = post(slow, body)
    took_slow = time.monotonic() - t0
    t0 = time.monotonic()
    status2, _, data2 = post(fast, body)
    took_fast = time.monotonic() - t0
    a, b = json.loads(data), json.loads(data2)
    assert status == status2 == 200
    tokens = a["usage"]["completion_tokens"]
    assert tokens > 50
    assert took_slow >= 0.2 + tokens / 2000 - 0.005  # a sleep never ends early
    assert took_fast >= (0.2 + tokens / 2000) / 10 - 0.005 and took_fast < took_slow
    assert a["usage"] == b["usage"] and a["choices"] == b["choices"]  # the same answer, sooner


def test_a_shared_instruction_in_single_message_prompts_is_cached_by_key_and_cache_key(simulator) -> None:
    h = simulator(shape="short", cache_block_tokens=64)
    instruction = "You are a careful annotator. " * 80  # about 580 tokens, shared
    first = json.loads(post(h, user(instruction + "Review one: great."))[2])["usage"]
    second = json.loads(post(h, user(instruction + "Review two: awful, never again."))[2])["usage"]
    assert first["cached_tokens"] == 0
    shared = len(json.dumps(["user", instruction])) // 4  # the serialized prefix both share
    assert shared - 64 <= second["cached_tokens"] <= shared and second["cached_tokens"] % 64 == 0
    assert second["cached_tokens"] == second["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens"]
    # a prompt_cache_key of its own: a cache of its own
    other = json.loads(post(h, user(instruction + "Review three.", prompt_cache_key="night-2"))[2])["usage"]
    again = json.loads(post(h, user(instruction + "Review four.", prompt_cache_key="night-2"))[2])["usage"]
    assert other["cached_tokens"] == 0 and again["cached_tokens"] > 0


def test_history_reasoning_is_billed_only_with_keep_all_on_both_sides(simulator) -> None:
    h = simulator()
    history = [{"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four. " * 100},
               {"role": "user", "content": "And 3 + 3?"}]
    counts = {}
    for keep in (None, "all"):
        job = Job(thinking="enabled", thinking_keep=keep, max_tokens=20_000, stream=False)
        prepared = build_request({"messages": history}, job)
        status, _, data = post(h, prepared.body)
        assert status == 200
        counts[keep] = (prepared.prompt_tokens_estimate, json.loads(data)["usage"]["prompt_tokens"])
    assert counts[None][0] == counts[None][1] and counts["all"][0] == counts["all"][1]  # client and server agree
    assert counts["all"][1] - counts[None][1] == estimate_text_tokens("Two and two make four. " * 100)


def test_the_dry_runs_range_holds_a_rehearsals_cost_nine_times_in_ten(tmp_path: Path, simulator) -> None:
    """Ten rehearsals of a 30-row thinking job (other seeds, so other lengths): the completion
    tokens each one paid fall inside the range its dry run gave, in at least 9 of the 10."""
    rows = [{"id": f"r{i}", "prompt": f"Write a short essay on subject number {i}."} for i in range(30)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    held = 0
    for seed in range(10):
        h = simulator(shape="kimi", speed=2000, seed=seed)
        job = fast_job(tmp_path, h.base_url, input=str(data), output=str(tmp_path / f"o{seed}"), thinking="enabled",
                       max_tokens=32768, stream=False, concurrency=16)
        plan = batchkimi.dry_run(job)
        low, high = plan.completion_range
        assert any("in 9 runs of 10" in line for line in plan.lines())
        summary = batchkimi.run(job)
        assert summary.final_status.get("ok", 0) + summary.final_status.get("truncated", 0) == 30
        paid = h.simulator.stats_json()["completion_tokens"]
        held += low <= paid <= high
    assert held >= 9, held  # (10 of 10 when written)


def test_a_path_in_a_caption_prompt_is_not_taken_for_a_list_of_labels(simulator) -> None:
    """`Describe {id}` with id `images/blink.gif` once got the answer `images`."""
    h = simulator()
    body = user("Describe images/blink.gif in one sentence.", thinking={"type": "disabled"}, stream=False)
    content = json.loads(post(h, body)[2])["choices"][0]["message"]["content"]
    assert content not in ("images", "blink") and len(content.split()) > 2
    labelled = json.loads(post(h, user("Answer yes/no: is the sky blue?", thinking={"type": "disabled"}))[2])
    assert labelled["choices"][0]["message"]["content"] in ("yes", "no")
