"""The model-graded scorer (``[score] method = "model"``): a second pass through the same engine
that asks a model whether each answer agrees with its reference, as JSON.

Each answered row becomes a grading request whose prompt holds the question, the reference and
the answer; its id is the sha256 of those three, so a grade is made once per distinct content
and reused by every later ``score`` (a retried row whose answer did not change is not graded
again). A pass writes the rows still without a grade to ``OUTPUT/_grader/input-<h>.jsonl`` and
runs them as an ordinary batchkimi job into ``OUTPUT/_grader/run-<h>/``: rate-limited like
the run, resumable (a killed pass resumes with the same command), its rows kept with the
grader's reasoning. The verdict ``{"correct": true|false, "explanation": ...}`` (or
``{"score": 0..1}``) becomes the row's ``score``; ``grade_explanation`` and
``grade_reasoning`` keep the why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..config import Job
from ..config.specs import Specs
from ..events import Hook, no_hook
from ..execution.run import Executor, Run
from ..output.parts import iter_newest
from ..output.results import kept_column_name
from ..output.sink import read_results
from .extract import answer_json

GRADER = "_grader"
DEFAULT_PROMPT = """You are grading an answer against a reference answer.

### Question
{question}

### Reference
{reference}

### Answer
{answer}

Does the answer agree with the reference in substance? Reply with JSON only: \
{{"correct": true or false, "explanation": "<one sentence>"}}"""


@dataclass(frozen=True)
class Grade:
    score: float | None
    explanation: str | None
    reasoning: str | None
    error: str | None = None


def grade_key(question: str | None, reference: str | None, answer: str | None) -> str:
    return hashlib.sha256(orjson.dumps([question, reference, answer])).hexdigest()[:32]


def verdict(content: str | None) -> tuple[float | None, str | None, str | None]:
    """(score, explanation, error) from a grader's answer."""
    try:
        obj = answer_json(content or "")
    except ValueError:
        return None, None, "the grader's answer is not JSON"
    if not isinstance(obj, dict):
        return None, None, "the grader's JSON is not an object"
    explanation = obj.get("explanation")
    explanation = explanation if isinstance(explanation, str) else None
    if isinstance(obj.get("correct"), bool):
        return float(obj["correct"]), explanation, None
    s = obj.get("score")
    if isinstance(s, int | float) and not isinstance(s, bool) and 0 <= s <= 1:
        return float(s), explanation, None
    return None, explanation, "the grader's JSON has neither 'correct' (true/false) nor 'score' (0 to 1)"


def _rows_to_grade(out: Path, specs: Specs) -> dict[str, dict[str, Any]]:
    """key -> grading row, for every answered row of the output."""
    sc = specs.score
    assert sc is not None
    expected, question = kept_column_name(sc.expected), kept_column_name(sc.question) if sc.question else None
    columns = ["row", "status", "content", expected] + ([question] if question else [])
    found: dict[str, dict[str, Any]] = {}
    for t in iter_newest(out, columns):
        cols = {c: t.column(c).to_pylist() for c in columns}
        for i in range(t.num_rows):
            if cols["status"][i] not in ("ok", "truncated") or cols["content"][i] is None or cols[expected][i] in (None, ""):
                continue
            q = cols[question][i] if question else None
            key = grade_key(q, cols[expected][i], cols["content"][i])
            found[key] = {"key": key, "question": q if q is not None else "(not given)",
                          "reference": cols[expected][i], "answer": cols["content"][i]}
    return found


def known_grades(out: Path) -> dict[str, Grade]:
    """Every grade made so far, by content key."""
    grades: dict[str, Grade] = {}
    folder = out / GRADER
    for run in sorted(folder.glob("run-*")) if folder.is_dir() else []:
        df = read_results(run, columns=["id", "status", "content", "reasoning_content", "error_message"], scores=False)
        for r in df.itertuples(index=False):
            if r.status == "ok":
                score, explanation, error = verdict(r.content)
                grades[str(r.id)] = Grade(score, explanation, r.reasoning_content if isinstance(r.reasoning_content, str) else None, error)
            elif str(r.id) not in grades:
                grades[str(r.id)] = Grade(None, None, None, f"the grading request failed: {r.error_message}")
    return grades


def grader_job(job: Job, specs: Specs, input_path: Path, output: Path) -> Job:
    sc = specs.score
    assert sc is not None
    return job.replace(
        input=str(input_path), input_format="jsonl", output=str(output), id_column="key",
        prompt_template=sc.grader_prompt or DEFAULT_PROMPT, system=None, model=sc.grader_model or job.model,
        response_format={"type": "json_object"}, tools=None, tool_choice=None, keep_columns=(), extract={}, score={},
        image_columns=(), video_columns=(), limit=None, max_cost_usd=0.0, max_total_tokens=0,
    )


async def grade_pending(out: Path, job: Job, specs: Specs, executor: Executor, *, hook: Hook = no_hook) -> dict[str, int]:
    """Grade the answers that have no grade yet (one resumable pass, its requests sent by
    ``executor``, a run of its own on ``OUTPUT/_grader/``); what it did."""

    rows = _rows_to_grade(out, specs)
    known = known_grades(out)
    pending = sorted(k for k in rows if k not in known or known[k].score is None)
    if not pending:
        return {"answers": len(rows), "graded_now": 0}
    name = hashlib.sha256("\n".join(pending).encode()).hexdigest()[:16]
    folder = out / GRADER
    folder.mkdir(exist_ok=True)
    input_path = folder / f"input-{name}.jsonl"
    if not input_path.exists():
        tmp = input_path.with_name(f".{input_path.name}.tmp")
        with open(tmp, "wb") as fh:
            for k in pending:
                fh.write(orjson.dumps(rows[k]) + b"\n")
        tmp.replace(input_path)
    summary = await Run(grader_job(job, specs, input_path, folder / f"run-{name}"), executor, hook=hook).execute()
    return {"answers": len(rows), "graded_now": summary.run_status.get("ok", 0), "grading_failed": summary.failed_rows}
