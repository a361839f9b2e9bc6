"""Numbers a release is gated on: accuracy that counts failed rows, comparisons that refuse
what they cannot decide or say what differs, labelling metrics against an independent count,
reading a killed run, and the files a CI job reads (Markdown, JUnit, CSV, OpenAI Batch)."""

from __future__ import annotations

import csv
import io
import json
import signal
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import batchkimi
from batchkimi.cli import cli
from batchkimi.output.sink import read_results
from batchkimi.stats import wilson

from .conftest import fast_job, write_jsonl
from .test_interrupt import job_file, rows_written, start, wait_for_rows


def arith(n: int, fault_every: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        a, b = 10 + i, 3 + i % 7
        fault = " [[sim:400]]" if fault_every and i % fault_every == 0 else ""
        rows.append({"qid": f"q{i:03d}", "question": f"What is {a} + {b}?{fault}", "answer": str(a + b)})
    return rows


def eval_job(tmp_path: Path, base_url: str, out: str, data: str = "eval.jsonl", fault_every: int = 0, **kw: Any):
    path = tmp_path / data
    if not path.exists():
        write_jsonl(path, arith(60, fault_every))
    kw.setdefault("prompt_template", "{question}")
    return fast_job(tmp_path, base_url, input=str(path), output=str(tmp_path / out), id_column="qid",
                    thinking="disabled", stream=False, max_tokens=256, max_attempts=1,
                    score={"expected": "answer", "method": "numeric"}, **kw)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def independent_accuracy(out: str, rows: int) -> float:
    """Right answers over every input row, read straight from the Parquet files."""
    df = read_results(out)
    right = ((df["status"] == "ok") & (df["score"] == 1.0)).sum()
    return float(right) / rows


def test_a_night_with_failed_rows_shows_them_in_accuracy_and_fails_the_gate(tmp_path: Path, simulator) -> None:
    h = simulator(accuracy=1.0, seed=1)
    clean = eval_job(tmp_path, h.base_url, "runs/2026-12-01")
    bad = eval_job(tmp_path, h.base_url, "runs/2026-12-02", data="faulty.jsonl", fault_every=3)
    batchkimi.run(clean)
    batchkimi.run(bad)
    rep = json.loads(invoke("report", bad.output, "--json").stdout)
    assert rep["status"] == {"ok": 40, "error": 20}
    acc = rep["accuracy"]
    assert acc["accuracy"] == round(independent_accuracy(bad.output, 60), 4) == round(40 / 60, 4)
    low, high = wilson(40, 60)
    assert acc["ci95"] == [round(low, 4), round(high, 4)] and acc["rows"] == 60
    assert rep["accuracy_scored"]["accuracy"] == 1.0 and rep["accuracy_scored"]["scored"] == 40  # beside it, named
    r = invoke("compare", clean.output, bad.output, "--max-accuracy-drop", "0.02", "--significant")
    assert r.exit_code == 5 and "REGRESSION: accuracy fell by 0.3333" in r.output, r.output


def test_comparisons_that_cannot_be_made_exit_1_saying_why(tmp_path: Path, simulator) -> None:
    h = simulator(accuracy=1.0, seed=1)
    good = eval_job(tmp_path, h.base_url, "runs/a")
    batchkimi.run(good)
    # a night killed before it wrote a row: only its manifest exists
    empty = tmp_path / "runs" / "b"
    empty.mkdir(parents=True)
    manifest = json.loads((Path(good.output) / "_manifest.json").read_text())
    (empty / "_manifest.json").write_text(json.dumps({**manifest, "state": "running", "counts": {}}))
    for args in (["--latest", str(tmp_path / "runs")], ["--latest", str(tmp_path / "runs"), "--json", "--max-accuracy-drop", "0"]):
        r = invoke("compare", *args)
        assert r.exit_code == 1 and "has no rows" in r.output and "Traceback" not in r.output, r.output
    # two runs without scores under an accuracy gate: cannot be decided
    plain = [fast_job(tmp_path, h.base_url, input=str(tmp_path / "eval.jsonl"), output=str(tmp_path / f"plain{i}"),
                      id_column="qid", prompt_template="{question}", stream=False, thinking="disabled") for i in (1, 2)]
    for job in plain:
        batchkimi.run(job)
    r = invoke("compare", plain[0].output, plain[1].output, "--max-accuracy-drop", "0", "--significant")
    assert r.exit_code == 1 and "no scores" in r.output, r.output
    r = invoke("compare", plain[0].output, plain[1].output)  # no gate: the numbers, and what is missing said
    assert r.exit_code == 0 and "neither run is scored" in r.output and "(+-)" not in r.output
    # runs of different inputs: no shared id
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"qid": f"x{i}", "question": "What is 1 + 1?", "answer": "2"} for i in range(5)])
    o = eval_job(tmp_path, h.base_url, "other", data="other.jsonl")
    batchkimi.run(o)
    r = invoke("compare", good.output, o.output)
    assert r.exit_code == 1 and "share no row id" in r.output
    # a folder that is not an output
    stray = tmp_path / "stray"
    stray.mkdir()
    pq.write_table(pq.read_table(next(Path(good.output).glob("part-*.parquet"))), stray / "data.parquet")
    for cmd in (["show", str(stray)], ["report", str(stray)], ["export", str(stray)], ["compare", good.output, str(stray)]):
        r = invoke(*cmd)
        assert r.exit_code == 1 and "is not a batchkimi output" in r.output, (cmd, r.output)


def test_compare_says_loudly_what_differs_and_latest_goes_by_the_night(tmp_path: Path, simulator) -> None:
    h = simulator(accuracy=0.9, seed=2)
    later_night = eval_job(tmp_path, h.base_url, "runs/2026-12-02")
    backfill = eval_job(tmp_path, h.base_url, "runs/2026-12-01", prompt_template="Q: {question}")
    batchkimi.run(later_night)
    batchkimi.run(backfill)  # made last, but it is the earlier night
    r = invoke("compare", "--latest", str(tmp_path / "runs"), "--json")
    c = json.loads(r.stdout)
    assert c["before"] == backfill.output and c["after"] == later_night.output
    assert c["mismatches"] == ["the prompt differs between the runs"]
    text = invoke("compare", backfill.output, later_night.output).output
    assert text.splitlines()[0] == "WARNING: the prompt differs between the runs"


def test_trend_shows_the_last_nights_with_intervals(tmp_path: Path, simulator) -> None:
    outs = []
    for night, acc in (("2026-12-01", 0.95), ("2026-12-02", 0.7), ("2026-12-03", 0.9)):
        h = simulator(accuracy=acc, seed=3)
        job = eval_job(tmp_path, h.base_url, f"runs/{night}")
        batchkimi.run(job)
        outs.append(job.output)
    t = json.loads(invoke("trend", str(tmp_path / "runs"), "--last", "2", "--json").stdout)
    assert [r["path"] for r in t["runs"]] == outs[1:]
    for r, out in zip(t["runs"], outs[1:], strict=True):
        k = independent_accuracy(out, 60) * 60
        assert r["accuracy"] == round(k / 60, 4) and r["accuracy_ci95"] == [round(x, 4) for x in wilson(k, 60)]
    text = invoke("trend", str(tmp_path / "runs"), "--html", str(tmp_path / "trend.html")).output
    assert len(text.splitlines()) == 4 and "2026-12-02" in text
    page = (tmp_path / "trend.html").read_text()
    assert page.count("<svg") == 2 and page.count("<tr><td>2026-12-0") == 3


def test_ci_files_markdown_and_junit_one_case_per_gate(tmp_path: Path, simulator) -> None:
    good, bad = simulator(accuracy=1.0, seed=1), simulator(accuracy=0.5, seed=2)
    a, b = eval_job(tmp_path, good.base_url, "a"), eval_job(tmp_path, bad.base_url, "b")
    batchkimi.run(a)
    batchkimi.run(b)
    md, xml = tmp_path / "ci" / "summary.md", tmp_path / "ci" / "junit.xml"  # a folder that does not exist yet
    r = invoke("compare", a.output, b.output, "--max-accuracy-drop", "0.05", "--max-error-rate-rise", "0.5",
               "--markdown", str(md), "--junit", str(xml))
    assert r.exit_code == 5
    suite = ET.parse(xml).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"accuracy", "error_rate"} and suite.get("failures") == "1"
    assert cases["accuracy"].find("failure") is not None and cases["error_rate"].find("failure") is None
    text = md.read_text()
    assert text.startswith("## Regression") and "| accuracy | **FAIL** |" in text and "| error_rate | pass |" in text


def test_label_metrics_match_an_independent_count(tmp_path: Path, simulator) -> None:
    h = simulator(seed=4)
    texts = ["great, love it", "awful, hate it", "it is a thing", "great but awful", "love love", "hate"]
    golds = ["positive", "negative", "neutral", "negative", "neutral", "negative"]
    rows = [{"id": f"r{i}", "text": texts[i % 6], "gold": golds[i % 6]} for i in range(36)]
    rows[5]["text"] += " [[sim:400]]"  # a failed row: predicted (none)
    job = fast_job(tmp_path, h.base_url, input=str(write_jsonl(tmp_path / "l.jsonl", rows)), stream=False,
                   thinking="disabled", max_attempts=1, prompt_template="Label as one of: positive, negative, neutral.\n{text}",
                   extract={"labels": ["positive", "negative", "neutral"]}, score={"expected": "gold", "method": "label"})
    batchkimi.run(job)
    m = json.loads(invoke("report", job.output, "--json").stdout)["labels"]
    df = read_results(job.output)
    pred = [p if s == "ok" and isinstance(p, str) else "(none)" for s, p in zip(df["status"], df["extracted"], strict=True)]
    gold = df["gold"].tolist()
    labels = ["positive", "negative", "neutral"]
    n = len(gold)
    for i, g in enumerate(labels):
        for j, p in enumerate(m["confusion_matrix"]["predicted"]):
            assert m["confusion_matrix"]["counts"][i][j] == sum(1 for x, y in zip(gold, pred, strict=True) if x == g and y == p)
    f1s = []
    for c in labels:
        tp = sum(1 for x, y in zip(gold, pred, strict=True) if x == y == c)
        prec = tp / max(1, pred.count(c))
        rec = tp / gold.count(c)
        f1 = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
        f1s.append(f1)
        assert m["per_label"][c]["f1"] == pytest.approx(f1, abs=1e-4) and m["per_label"][c]["support"] == gold.count(c)
    assert m["macro_f1"] == pytest.approx(sum(f1s) / 3, abs=1e-4)
    po = sum(1 for x, y in zip(gold, pred, strict=True) if x == y) / n
    pe = sum(gold.count(c) * pred.count(c) for c in set(gold) | set(pred)) / n**2
    assert m["kappa"] == pytest.approx((po - pe) / (1 - pe), abs=1e-4)
    assert m["no_label_rate"] == pytest.approx(pred.count("(none)") / n, abs=1e-4) and pred.count("(none)") == 1


def test_a_killed_run_is_read_from_its_journal_and_said_unfinished(tmp_path: Path, simulator) -> None:
    h = simulator(latency_ms=40)
    job = job_file(tmp_path, h.base_url)
    # rows stay in the journal: no part is written before the run ends
    job.write_text(job.read_text().replace("rows_per_part = 25", "rows_per_part = 100000")
                   .replace("flush_interval_s = 0.5", "flush_interval_s = 3600"))
    out = tmp_path / "out"
    proc = start(job)
    wait_for_rows(proc, out, 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    on_disk = rows_written(out)
    assert not list(out.glob("part-*.parquet")) and any((out / "_journal").glob("seg-*.jsonl"))  # rows only in the journal
    df = read_results(out)
    assert len(df) == on_disk and df["row"].is_unique
    r = invoke("show", str(out))
    assert r.output.startswith(f"{on_disk} rows (the run did not finish: running)")
    rep = json.loads(invoke("report", str(out), "--json").stdout)
    assert rep["rows"] == on_disk and rep["partial"] and not rep["finished"]
    exported = invoke("export", str(out)).stdout.strip().splitlines()
    assert len([line for line in exported if line.startswith("{")]) == on_disk


def test_report_json_has_a_schema_version_nulls_and_provenance(tmp_path: Path, simulator) -> None:
    h = simulator(seed=1)
    job = fast_job(tmp_path, h.base_url, input=str(write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "hi"}])),
                   stream=False, thinking="disabled")
    batchkimi.run(job)
    rep = json.loads(invoke("report", job.output, "--json").stdout)
    assert rep["schema_version"] == 2 and rep["accuracy"] is None and rep["labels"] is None and rep["by_group"] is None
    p = rep["provenance"]
    assert p["model"] == job.model and len(p["prompt_hash"]) == 16 and p["input_fingerprint"] and p["created"]
    assert p["batchkimi_version"] == batchkimi.__version__


def test_export_files_keep_their_schema_folder_and_the_openai_batch_shape(tmp_path: Path, simulator) -> None:
    h = simulator(seed=5, accuracy=1.0)
    rows = [{"qid": "q0", "question": "What is 1 + 1?", "answer": "2"},
            {"qid": "q1", "question": "What is 2 + 2? [[sim:400]]", "answer": "4"},
            {"qid": "q2", "question": "What is 3 + 3?", "answer": "6"}]
    write_jsonl(tmp_path / "e.jsonl", rows)
    job = eval_job(tmp_path, h.base_url, "out", data="e.jsonl")
    batchkimi.run(job)
    # row 0's score made for an older attempt (as after a retry): it has no score now
    scores = pq.read_table(Path(job.output) / "_scores.parquet")
    pq.write_table(scores.slice(1), Path(job.output) / "_scores.parquet")
    dest = tmp_path / "nodir" / "x.csv"
    assert invoke("export", job.output, "--format", "csv", "--output", str(dest)).exit_code == 0
    header = next(csv.reader(io.StringIO(dest.read_text())))
    assert {"score", "score_error", "extract_stage"} <= set(header)
    page = tmp_path / "nodir2" / "r.html"
    assert invoke("report", job.output, "--html", str(page)).exit_code == 0 and page.exists()

    lines = [json.loads(x) for x in invoke("export", job.output, "--format", "openai-batch").stdout.splitlines() if x.startswith("{")]
    by_id = {x["custom_id"]: x for x in lines}
    ok, refused = by_id["q0"], by_id["q1"]
    assert ok["response"]["body"]["id"].startswith("chatcmpl-") and ok["error"] is None
    assert ok["response"]["body"]["id"] == read_results(job.output).set_index("id").loc["q0", "response_id"]
    assert refused["response"]["status_code"] == 400 and refused["error"] is None
    assert refused["response"]["body"]["error"]["message"]
    # no HTTP response at all (a row that could not make a request): the error, and no response
    write_jsonl(tmp_path / "bad.jsonl", [{"qid": "z0", "answer": "1"}])  # no question to fill the template
    invalid = eval_job(tmp_path, h.base_url, "invalid", data="bad.jsonl")
    batchkimi.run(invalid)
    line = json.loads(invoke("export", invalid.output, "--format", "openai-batch").stdout.splitlines()[0])
    assert line["response"] is None and line["error"]["code"] == "invalid_row" and "question" in line["error"]["message"]


def test_samples_each_row_k_times_resumable_per_sample_with_pass_and_majority(tmp_path: Path, simulator) -> None:
    import math
    from collections import Counter

    h = simulator(accuracy=0.6, seed=7)
    k, n = 5, 20
    write_jsonl(tmp_path / "s.jsonl", arith(n))
    # a first run stopped by a token budget part way, then the same command without it
    job = eval_job(tmp_path, h.base_url, "s", data="s.jsonl", samples=k, max_total_tokens=600, concurrency=2)
    plan = batchkimi.dry_run(job)
    assert plan.status["to_send"] == plan.total_rows == n * k  # the dry run counts (and prices) every sample
    first = batchkimi.run(job)
    assert first.exit_code == 4 and 0 < h.simulator.stats_json()["requests"] < n * k
    rest = batchkimi.run(job.replace(max_total_tokens=None))
    assert rest.exit_code == 0
    assert h.simulator.stats_json()["requests"] == n * k  # every sample bought once, across the two runs
    df = read_results(job.output)
    assert len(df) == n * k and sorted(Counter(df["id"]).values()) == [k] * n
    assert sorted(df["sample"].tolist()) == sorted(list(range(k)) * n)
    assert df.groupby("id")["content"].nunique().max() > 1  # samples are answered on their own

    rep = json.loads(invoke("report", job.output, "--json").stdout)
    s = rep["samples"]
    right = df.assign(r=(df["status"] == "ok") & (df["score"] == 1.0)).groupby("id")["r"].sum()
    for j in range(1, k + 1):  # the unbiased estimator, computed here independently
        want = sum(1 - (math.comb(k - c, j) / math.comb(k, j) if k - c >= j else 0.0) for c in right) / n
        assert s["pass_at_k"][str(j)] == round(want, 4)
    votes = 0
    for _, g in df.groupby("id"):
        numbers = Counter(int(x) for x in g["content"].str.extract(r"(-?\d+)\.?$")[0])
        (top, count), *others = numbers.most_common()
        if not others or others[0][1] < count:
            votes += str(top) == str(g["answer"].iloc[0])
    assert s["maj_at_k"] == round(votes / n, 4)
    assert rep["accuracy"]["accuracy"] == s["pass_at_k"]["1"]  # every sample counts once

    # a resume with another number of samples would mix runs: refused, naming the key
    r = invoke("run", "--help")
    assert "--samples" in r.output
    with pytest.raises(batchkimi.errors.OutputError, match="samples"):
        batchkimi.run(job.replace(samples=3))


def test_an_answer_the_model_grader_has_not_graded_is_undecided_not_wrong() -> None:
    import pandas as pd

    from batchkimi.report.report import _headline

    df = pd.DataFrame({"status": ["ok", "ok", "error", "ok"], "score": [1.0, None, None, None],
                       "score_error": [None, "not graded yet: run `batchkimi score`", "no answer to score (status error)",
                                       "the answer holds no number"], "gold": ["1", "2", "3", "4"]})
    head = _headline(df, "gold")
    assert head is not None and head["rows"] == 3 and head["accuracy"] == round(1 / 3, 4)  # 1 right of 3 decided
