"""Extraction, scoring, report, compare, export and the budget: tables for every extractor and
scorer, then whole runs on the simulator and the commands over their output directories."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

import batchkimi
from batchkimi.cli import cli
from batchkimi.config import load_job
from batchkimi.config.specs import ExtractSpec, specs_of
from batchkimi.errors import ConfigError
from batchkimi.output.sink import read_results
from batchkimi.report.compare import mcnemar_p
from batchkimi.scoring.extract import extract, find_label
from batchkimi.scoring.score import ScoreSpec, Specs, check_tool_calls, grade, score_row
from batchkimi.stats import wilson

from .conftest import fast_job, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("positive", "negative", "neutral")


# ---- extractors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content, spec, values, error", [
    ('{"label": "positive", "confidence": 0.9}', ExtractSpec(json=("label", "confidence")),
     {"extracted_label": "positive", "extracted_confidence": "0.9"}, None),
    ('Sure:\n```json\n{"label": "neutral"}\n```', ExtractSpec(json=("label",)), {"extracted_label": "neutral"}, None),
    ('Here it is {"label": "negative"} as asked.', ExtractSpec(json=("label",)), {"extracted_label": "negative"}, None),
    ('{"labels": ["a"]}', ExtractSpec(json=("label",)), {"extracted_label": None}, "the answer's JSON has no label"),
    ("no json here", ExtractSpec(json=("label",)), {"extracted_label": None}, "the answer is not JSON"),
    ('["positive"]', ExtractSpec(json=("label",)), {"extracted_label": None}, "the answer's JSON is list, not an object"),
    ("Answer: 42 apples", ExtractSpec(regex=r"Answer:\s*(\d+)"), {"extracted": "42"}, None),
    ("final=Paris.", ExtractSpec(regex=r"final=(?P<value>\w+)"), {"extracted": "Paris"}, None),
    ("nothing", ExtractSpec(regex=r"Answer:\s*(\d+)"), {"extracted": None}, "the regex does not match the answer"),
    ("  POSITIVE. ", ExtractSpec(labels=LABELS), {"extracted": "positive"}, None),
    ("I would say this review is clearly negative overall.", ExtractSpec(labels=LABELS), {"extracted": "negative"}, None),
    ("Not negative at all; the label is positive", ExtractSpec(labels=LABELS), {"extracted": "positive"}, None),
    ("It is nonnegative", ExtractSpec(labels=LABELS), {"extracted": None}, "the answer names none of: positive, negative, neutral"),
])
def test_extractors(content: str, spec: ExtractSpec, values: dict, error: str | None) -> None:
    assert extract(content, spec) == (values, error)


def test_a_longer_label_wins_over_a_shorter_one_inside_it() -> None:
    assert find_label("Very positive!", ["positive", "very positive"]) == "very positive"
    assert find_label("Sentiment: Mixed Feelings", ["mixed feelings", "negative"]) == "mixed feelings"


# ---- scorers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method, value, expected, score, error, extra", [
    ("exact", " Paris ", "Paris", 1.0, None, {}),
    ("exact", "paris", "Paris", 0.0, None, {}),
    ("normalized", "  PARIS.  ", "paris", 1.0, None, {}),
    ("normalized", "Ｐａｒｉｓ", "paris", 1.0, None, {}),  # full-width letters fold too
    ("contains", "The capital is Paris, of course.", "paris", 1.0, None, {}),
    ("contains", "The capital is Lyon.", "paris", 0.0, None, {}),
    ("regex", "The answer is 1,234.", r"1,?234", 1.0, None, {}),
    ("regex", "x", "(", None, "the expected value is not a valid regular expression: missing ), unterminated subpattern at position 0", {}),
    ("numeric", "So the total is 1,234.50 dollars.", "1234.5", 1.0, None, {}),
    ("numeric", "Step 1: 3 + 4 = 7. Final: 7", "#### 7", 1.0, None, {}),  # GSM8K's answer format
    ("numeric", "It is 0.1001", "0.1", 0.0, None, {}),
    ("numeric", "It is 0.1001", "0.1", 1.0, None, {"tolerance": 0.001}),
    ("numeric", "I do not know", "7", 0.0, "the answer holds no number", {}),
    ("numeric", "7", "seven", None, "the expected value 'seven' holds no number", {}),
    ("json_field", '{"answer": "Positive "}', "positive", 1.0, None, {"field": "answer"}),
    ("json_field", '{"answer": 7}', "7", 1.0, None, {"field": "answer"}),
    ("json_field", '{"other": 7}', "7", 0.0, "the answer's JSON has no answer", {"field": "answer"}),
    ("label", "I think it's Negative.", "negative", 1.0, None, {"labels": LABELS}),
    ("label", "neutral", "negative", 0.0, None, {"labels": LABELS}),
    ("label", "no idea", "negative", 0.0, "the answer names none of: positive, negative, neutral", {"labels": LABELS}),
])
def test_scorers(method: str, value: str, expected: str, score: float | None, error: str | None, extra: dict) -> None:
    labels = extra.pop("labels", ())
    spec = ScoreSpec("gold", method, labels=tuple(labels), **extra)
    assert grade(value, expected, spec, labels) == (score, error)


def test_a_row_without_an_answer_or_expected_value_gets_no_score_and_says_why() -> None:
    specs = Specs(ExtractSpec(labels=LABELS), ScoreSpec("gold", "label", labels=LABELS))
    r = score_row("error", None, None, "positive", specs, {})
    assert r.score is None and r.score_error == "no answer to score (status error)" and r.extracted == {"extracted": None}
    r = score_row("ok", "positive", None, None, specs, {})
    assert r.score is None and r.score_error == "no expected value in column 'gold'"
    r = score_row("ok", "I cannot tell", None, "positive", specs, {})
    assert r.score == 0.0 and r.extract_error == r.score_error == "the answer names none of: positive, negative, neutral"


def test_tool_call_arguments_are_checked_against_their_schema() -> None:
    schemas = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                               "required": ["city"], "additionalProperties": False}}

    def calls(*args: Any, name: str = "get_weather") -> str:
        return json.dumps([{"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": a}}
                           for i, a in enumerate(args)])

    assert check_tool_calls(calls('{"city": "Paris", "days": 3}'), schemas) == (True, None)
    assert check_tool_calls(calls('{"city": "Paris"}', '{"days": 3}'), schemas) == (False, "call 1 (get_weather): 'city' is a required property")
    assert check_tool_calls(calls('{"city": "Paris", "days": "3"}'), schemas) == (False, "call 0 (get_weather): '3' is not of type 'integer'")
    assert check_tool_calls(calls('{"city": "Par'), schemas) == (False, "call 0 (get_weather): the arguments are not JSON")
    assert check_tool_calls(calls("{}", name="nope"), schemas) == (False, "call 0 names an unknown tool 'nope'")
    assert check_tool_calls(None, schemas) == (None, None)


@pytest.mark.parametrize("extract_, score, message", [
    ({"json": ["a"], "regex": "x"}, None, "exactly one of"),
    ({"regex": "("}, None, "not a valid regular expression"),
    (None, {"method": "exact"}, "score.expected"),
    (None, {"expected": "gold", "method": "fuzzy"}, "score.method must be one of"),
    (None, {"expected": "gold", "method": "json_field"}, "needs score.field"),
    (None, {"expected": "gold", "method": "label"}, "needs the labels"),
    (None, {"expected": "gold", "tolerence": 1}, "unknown keys: tolerence"),
])
def test_bad_specs_are_refused_naming_the_key(extract_: Any, score: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        specs_of(extract_, score)


def test_wilson_and_mcnemar_match_known_values() -> None:
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook 95% interval for 8/10
    assert round(mcnemar_p(10, 2), 4) == 0.0386  # exact binomial, two-sided
    assert mcnemar_p(5, 5) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert math.isclose(mcnemar_p(3000, 2700), mcnemar_p(2700, 3000))  # the approximation is symmetric too


# ---- whole runs ---------------------------------------------------------------------------------
def arith(n: int) -> list[dict[str, Any]]:
    ops = [("+", "addition"), ("-", "subtraction"), ("*", "multiplication")]
    rows = []
    for i in range(n):
        sym, name = ops[i % 3]
        a, b = 10 + i, 3 + i % 7
        rows.append({"qid": f"q{i:03d}", "question": f"What is {a} {sym} {b}?", "op": name,
                     "answer": str(eval(f"{a}{sym}{b}"))})  # noqa: S307 - our own arithmetic
    return rows


def eval_job(tmp_path: Path, base_url: str, out: str, **kw: Any):
    data = tmp_path / "eval.jsonl"
    if not data.exists():
        write_jsonl(data, arith(60))
    return fast_job(tmp_path, base_url, input=str(data), output=str(tmp_path / out), id_column="qid",
                    prompt_template="{question}", thinking="disabled", stream=False, max_tokens=256,
                    response_format={"type": "json_object"}, extract={"json": ["answer"]},
                    score={"expected": "answer", "method": "numeric", "group_by": ["op"]}, **kw)


def test_a_scored_run_reports_accuracy_and_score_recomputes_without_sending(tmp_path: Path, simulator) -> None:
    h = simulator(accuracy=0.8, seed=3)
    job = eval_job(tmp_path, h.base_url, "night1")
    summary = batchkimi.run(job)
    assert summary.exit_code == 0 and summary.scores["scored"] == 60
    df = read_results(job.output)
    assert set(df["score"]) <= {0.0, 1.0} and "extracted_answer" in df and "op" in df
    right = (df["extracted_answer"] == df["answer"]).mean()
    assert df["score"].mean() == right and 0.6 < right < 0.95  # about the simulator's accuracy
    r = CliRunner().invoke(cli, ["report", job.output, "--json"])
    rep = json.loads(r.output)
    assert rep["accuracy"]["scored"] == 60 and rep["accuracy"]["accuracy"] == round(right, 4)
    assert set(rep["by_group"]["op"]) == {"addition", "subtraction", "multiplication"}
    assert rep["status"] == {"ok": 60} and rep["latency_s"]["n"] == 60 and rep["cost_usd"]["estimate"]
    text = CliRunner().invoke(cli, ["report", job.output]).output
    assert "accuracy: " in text and "accuracy by op:" in text and "cost: $" in text

    # a stricter scorer, from another job file: recomputed over the output, nothing sent
    requests = h.simulator.stats_json()["requests"]
    other = tmp_path / "strict.toml"
    other.write_text('[score]\nexpected = "answer"\nmethod = "exact"\n')
    r = CliRunner().invoke(cli, ["score", job.output, "--job", str(other)])
    assert r.exit_code == 0, r.output
    assert h.simulator.stats_json()["requests"] == requests
    assert read_results(job.output)["score"].sum() == 0  # the raw answers are JSON, never the bare number


def test_compare_finds_the_flips_and_fails_only_past_its_thresholds(tmp_path: Path, simulator) -> None:
    good, bad = simulator(accuracy=0.95, seed=1), simulator(accuracy=0.5, seed=2)
    a = eval_job(tmp_path, good.base_url, "runs/night1")
    b = eval_job(tmp_path, bad.base_url, "runs/night2")
    batchkimi.run(a)
    batchkimi.run(b)
    r = CliRunner().invoke(cli, ["compare", a.output, b.output, "--json"])
    c = json.loads(r.output)
    p = c["paired"]
    da, db = read_results(a.output).set_index("id"), read_results(b.output).set_index("id")
    assert p["flipped_to_wrong"] == int(((da["score"] == 1) & (db["score"] == 0)).sum())
    assert p["flipped_to_right"] == int(((da["score"] == 0) & (db["score"] == 1)).sum())
    assert p["rows"] == 60 and p["mcnemar_p"] < 0.05 and r.exit_code == 0  # no threshold: no failure
    r = CliRunner().invoke(cli, ["compare", a.output, b.output, "--max-accuracy-drop", "0.1", "--significant"])
    assert r.exit_code == 5 and "REGRESSION: accuracy fell" in r.output
    r = CliRunner().invoke(cli, ["compare", a.output, b.output, "--max-accuracy-drop", "0.9"])
    assert r.exit_code == 0
    r = CliRunner().invoke(cli, ["compare", b.output, a.output, "--max-accuracy-drop", "0.0"])
    assert r.exit_code == 0  # an improvement is no regression
    r = CliRunner().invoke(cli, ["compare", "--latest", str(tmp_path / "runs"), "--json"])
    assert json.loads(r.output)["after"] == b.output


def test_export_formats_read_back(tmp_path: Path, simulator) -> None:
    h = simulator(seed=5)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "great"}, {"id": "b", "text": "bad"},
                                               "not json at all", {"id": "d"}])
    job = fast_job(tmp_path, h.base_url, input=str(data), prompt_template="Label one of: positive, negative.\n{text}",
                   thinking="enabled", max_tokens=512, keep_columns=("text",))
    batchkimi.run(job)
    out = job.output
    runner = CliRunner()
    r = runner.invoke(cli, ["export", out, "--format", "jsonl", "--output", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 0, r.output
    j = pd.read_json(tmp_path / "x.jsonl", lines=True)
    assert len(j) == 4 and set(j["status"]) == {"ok", "invalid"} and "reasoning_content" in j
    r = runner.invoke(cli, ["export", out, "--format", "csv", "--output", str(tmp_path / "x.csv")])
    c = pd.read_csv(tmp_path / "x.csv")
    assert len(c) == 4 and sorted(c["id"].astype(str)) == sorted(j["id"].astype(str))
    r = runner.invoke(cli, ["export", out, "--format", "openai-batch"])
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    ok = next(x for x in lines if x["custom_id"] == "a")
    assert set(ok) == {"id", "custom_id", "response", "error"} and ok["error"] is None
    body = ok["response"]["body"]
    assert ok["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] in ("positive", "negative") and body["choices"][0]["message"]["reasoning_content"]
    assert body["usage"]["total_tokens"] > 0
    bad = next(x for x in lines if x["custom_id"] not in ("a", "b"))
    assert bad["response"] is None and bad["error"]["code"] == "invalid_row" and bad["error"]["message"]
    assert list(csv.reader(io.StringIO((tmp_path / "x.csv").read_text())))[0][:3] == ["id", "row", "status"]


def test_a_budget_stops_the_run_cleanly_and_a_rerun_goes_on(tmp_path: Path, simulator) -> None:
    h = simulator(latency_ms=100)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Tell me about {i} " * 20} for i in range(40)])
    job = fast_job(tmp_path, h.base_url, input=str(data), thinking="disabled", stream=False, max_tokens=512,
                   concurrency=8, max_total_tokens=2000)
    first = batchkimi.run(job)
    sent = h.simulator.stats_json()["requests"]
    assert first.budget_stop and first.exit_code == 4 and "2,000-token budget" in first.budget_stop
    assert first.prompt_tokens + first.completion_tokens <= 2000  # in-flight requests were counted
    assert 0 < sent < 40 and first.final_status == {"ok": sent}
    second = batchkimi.run(job.replace(max_total_tokens=0))
    assert second.exit_code == 0 and second.final_status == {"ok": 40}
    assert h.simulator.stats_json()["requests"] == 40  # none sent twice
    with pytest.raises(ConfigError, match="needs a price for ep-123"):
        load_job(None, {"input": str(data), "output": str(tmp_path / "o"), "model": "ep-123", "max_cost_usd": 1})


def test_a_nightly_output_path_carries_the_date(tmp_path: Path) -> None:
    job_file = tmp_path / "nightly.toml"
    job_file.write_text('input = "x.jsonl"\noutput = "runs/{job}/{date}"\n')
    import datetime

    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    assert load_job(job_file).output == str(tmp_path / "runs" / "nightly" / today)


def test_the_shipped_scored_jobs_report_an_accuracy(tmp_path: Path) -> None:
    for name, out in (("demo.toml", "demo"), ("nightly_eval.toml", "nightly"), ("label_json.toml", "lj"),
                      ("graded_eval.toml", "graded")):
        job = load_job(ROOT / "jobs" / name, {"output": str(tmp_path / out), "base_url": "simulator"})
        summary = batchkimi.run(job)
        assert summary.scores.get("scored", 0) > 0, name
        rep = json.loads(CliRunner().invoke(cli, ["report", job.output, "--json"]).output)
        assert 0 < rep["accuracy"]["accuracy"] <= 1, name


def test_tool_rows_record_whether_their_arguments_are_valid(tmp_path: Path, simulator) -> None:
    h = simulator(bad_tool_args_rate=0.5, seed=11)
    data = write_jsonl(tmp_path / "w.jsonl", [{"id": f"w{i}", "prompt": f"What is the weather in City{i} today?"}
                                             for i in range(30)])
    job = load_job(ROOT / "jobs" / "tools.toml", {"input": str(data), "output": str(tmp_path / "t"), "base_url": h.base_url})
    asyncio.run(batchkimi.run_async(job))
    df = read_results(job.output)
    with_calls = df[df["tool_calls"].notna()]
    assert len(with_calls) == 30 and with_calls["tool_calls_valid"].notna().all()
    broken = with_calls[with_calls["tool_calls_valid"] == False]  # noqa: E712
    assert 0 < len(broken) < 30 and broken["tool_calls_error"].str.contains("not JSON").all()
    assert with_calls.loc[with_calls["tool_calls_valid"] == True, "tool_calls_error"].isna().all()  # noqa: E712
    assert json.loads(CliRunner().invoke(cli, ["report", job.output, "--json"]).output)["tool_calls_valid"] == {
        "rows": 30, "valid": 30 - len(broken)}


@pytest.mark.parametrize("content, expected", [
    ('{"correct": true, "explanation": "same city"}', (1.0, "same city", None)),
    ('```json\n{"correct": false}\n```', (0.0, None, None)),
    ('{"score": 0.5, "explanation": "half"}', (0.5, "half", None)),
    ('{"score": 7}', (None, None, "the grader's JSON has neither 'correct' (true/false) nor 'score' (0 to 1)")),
    ("Correct!", (None, None, "the grader's answer is not JSON")),
])
def test_grader_verdicts(content: str, expected: tuple) -> None:
    from batchkimi.scoring.grader import verdict

    assert verdict(content) == expected


def test_a_model_graded_run_grades_each_distinct_answer_once(tmp_path: Path, simulator) -> None:
    from batchkimi.request import build_request
    from batchkimi.scoring.grader import DEFAULT_PROMPT, grader_job

    h = simulator()
    job = load_job(ROOT / "jobs" / "graded_eval.toml", {"output": str(tmp_path / "g"), "base_url": h.base_url})
    summary = batchkimi.run(job)
    stats = h.simulator.stats_json()
    assert summary.scores["scored"] == 12 and stats["requests"] == 24  # 12 answers, then 12 grades
    df = read_results(job.output)
    assert set(df["score"]) == {0.0, 1.0} and df["grade_explanation"].notna().all()
    # the simulated grader says "correct" exactly when the answer states the reference
    stated = [r.lower() in a.lower() for r, a in zip(df["reference"], df["content"], strict=True)]
    assert df["score"].tolist() == [float(x) for x in stated]
    (Path(job.output) / "_scores.parquet").unlink()
    r = CliRunner().invoke(cli, ["score", job.output])
    assert r.exit_code == 0 and "0 answers graded now, 12 in all" in r.output
    assert h.simulator.stats_json()["requests"] == 24  # every grade came from the cache
    rep = json.loads(CliRunner().invoke(cli, ["report", job.output, "--json"]).output)
    assert rep["grader"]["requests"] == 12 and rep["grader"]["tokens"] > 0 and rep["grader"]["cost_usd"] > 0
    assert read_results(job.output)["score"].tolist() == df["score"].tolist()
    # what the grader is asked
    specs = specs_of(job.extract, job.score, job.tools)
    gj = grader_job(job, specs, tmp_path / "x.jsonl", tmp_path / "y")
    body = build_request({"key": "k", "question": "Q?", "reference": "R", "answer": "A"}, gj).body
    prompt = body["messages"][-1]["content"]
    assert gj.prompt_template == DEFAULT_PROMPT and body["response_format"] == {"type": "json_object"}
    assert "### Question\nQ?" in prompt and "### Reference\nR" in prompt and "### Answer\nA" in prompt
    assert '{"correct": true or false' in prompt
