"""Extract values from answers and score them, over a run's output, never re-sending a request.

A job's ``[extract]`` table says how to pull a value out of each answer, its ``[score]`` table
how to grade it against an expected column (both optional)::

    [extract]
    json = ["label", "confidence"]   # fields of a JSON answer -> extracted_label, extracted_confidence
    # regex = "Answer:\\s*(\\w+)"    # group 1 (or the group named "value") -> extracted
    # labels = ["positive", "negative", "neutral"]   # the label the answer names -> extracted

    [score]
    expected = "gold"                # the input column with the expected answer (kept automatically)
    method = "label"                 # exact | normalized | contains | regex | numeric | json_field | label
    tolerance = 1e-6                 # numeric: |answer - expected| at most this
    field = "label"                  # json_field: the field compared
    group_by = ["category"]          # accuracy by these columns too (kept automatically)

:func:`score_output` reads the output part by part (flat memory) and writes
``OUTPUT/_scores.parquet``, one row per output row: the extracted values, whether the row's
tool-call arguments follow their tool's JSON schema, the expected value, ``score`` (1.0 right,
0.0 wrong, null when there is nothing to score) and ``score_error`` (why there is no score, or
why the extraction failed). A row that cannot be extracted or scored gets its reason, never a
crash, and its request ``status`` is never changed. :func:`~batchkimi.output.sink.read_results`
joins the scores to the rows.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config.specs import ScoreSpec, Specs
from ..files import fsync_dir
from ..output import parts
from ..output.results import kept_column_name
from ..output.sink import SCORES
from .extract import answer_json, as_text, extract_read, normalize, read_label, read_number

NOT_GRADED = "not graded yet"  # the score_error of an answer the model grader has not graded: undecided, not wrong


# ---- one row -----------------------------------------------------------------------------------
@dataclass
class RowScore:
    extracted: dict[str, str | None] = field(default_factory=dict)
    extract_error: str | None = None
    stage: str | None = None  # how the value was read: exact, strict, flexible, json, regex
    key: str | None = None  # the value compared, as equal answers share it (for majority votes)
    tool_calls_valid: bool | None = None
    tool_calls_error: str | None = None
    score: float | None = None
    score_error: str | None = None
    grade_explanation: str | None = None
    grade_reasoning: str | None = None


def check_tool_calls(raw: str | None, schemas: Mapping[str, Any]) -> tuple[bool | None, str | None]:
    """Whether every tool call's arguments are JSON following its tool's parameters schema."""
    if not raw:
        return None, None
    import jsonschema

    try:
        calls = json.loads(raw)
    except ValueError:
        return False, "tool_calls is not JSON"
    for i, call in enumerate(calls if isinstance(calls, list) else []):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in schemas:
            return False, f"call {i} names an unknown tool {name!r}"
        try:
            args = json.loads(fn.get("arguments") or "{}")  # type: ignore[union-attr]
        except (TypeError, ValueError):
            return False, f"call {i} ({name}): the arguments are not JSON"
        schema = schemas[name]
        if schema:
            try:
                jsonschema.validate(args, schema)
            except jsonschema.ValidationError as exc:
                return False, f"call {i} ({name}): {exc.message}"
            except jsonschema.SchemaError as exc:
                return False, f"the schema of tool {name} is not valid JSON Schema: {exc.message}"
    return True, None


def grade(value: str, expected: str, spec: ScoreSpec, labels: Sequence[str]) -> tuple[float | None, str | None]:
    """(score, error) of one answer value against its expected value."""
    score, error, _, _ = grade_read(value, expected, spec, labels)
    return score, error


def grade_read(value: str, expected: str, spec: ScoreSpec, labels: Sequence[str], *,
               field_value: bool = False) -> tuple[float | None, str | None, str | None, str | None]:
    """(score, error, the stage that read the answer, the answer's key: the value compared, in
    the form two equal answers share, for majority votes). ``field_value``: ``value`` is a field
    of the answer's JSON, compared as a value (folded), never searched for a label."""
    method = spec.method
    if method == "exact":
        return float(value.strip() == expected.strip()), None, None, value.strip()
    if method == "normalized" or (field_value and method == "label"):
        return float(normalize(value) == normalize(expected)), None, None, normalize(value)
    if method == "contains":
        return float(normalize(expected) in normalize(value)), None, None, normalize(value)
    if method == "regex":
        try:
            return float(re.search(expected, value) is not None), None, None, normalize(value)
        except re.error as exc:
            return None, f"the expected value is not a valid regular expression: {exc}", None, None
    if method == "numeric":
        want = read_number(expected, spec.decimal)
        if want.value is None:
            return None, f"the expected value {expected[:60]!r} holds no number" + (
                f" ({want.error})" if want.error and "no number" not in want.error else ""), None, None
        got = read_number(value, spec.decimal)
        if got.value is None:
            return 0.0, got.error, got.stage, None
        return float(abs(float(got.value - want.value)) <= spec.tolerance), None, got.stage, str(got.value)
    if method == "json_field":
        try:
            obj = answer_json(value, (spec.field,) if spec.field else ())
        except ValueError as exc:
            return 0.0, str(exc), None, None
        if not isinstance(obj, dict) or spec.field not in obj:
            return 0.0, f"the answer's JSON has no {spec.field}", "json", None
        got_text = normalize(as_text(obj[spec.field]) or "")
        return float(got_text == normalize(expected)), None, "json", got_text
    r = read_label(value, labels)
    if r.value is None:
        return 0.0, r.error, r.stage, None
    return float(normalize(r.value) == normalize(expected)), None, r.stage, r.value


def score_row(status: str, content: str | None, tool_calls: str | None, expected: str | None, specs: Specs,
              schemas: Mapping[str, Any], *, question: str | None = None, grades: Mapping[str, Any] | None = None) -> RowScore:
    out = RowScore()
    answered = status in ("ok", "truncated") and content is not None
    if specs.extract is not None:
        if answered:
            out.extracted, out.extract_error, out.stage = extract_read(content or "", specs.extract)
        else:
            out.extracted = dict.fromkeys(specs.extract.columns)
    if schemas and status in ("ok", "truncated"):
        out.tool_calls_valid, out.tool_calls_error = check_tool_calls(tool_calls, schemas)
    sc = specs.score
    if sc is None:
        return out
    if not answered:
        out.score_error = f"no answer to score (status {status})"
        return out
    if expected is None or expected == "":
        out.score_error = f"no expected value in column '{sc.expected}'"
        return out
    if sc.method == "model":
        from .grader import grade_key

        g = (grades or {}).get(grade_key(question, expected, content))
        if g is None:
            out.score_error = f"{NOT_GRADED}: run `batchkimi score` (it sends the grading requests)"
        else:
            out.score, out.score_error = g.score, g.error
            out.grade_explanation, out.grade_reasoning = g.explanation, g.reasoning
        return out
    ex = specs.extract
    value = content or ""
    if ex is not None and sc.method != "json_field":
        first = next(iter(out.extracted.values()), None)
        if first is None:
            out.score, out.score_error = 0.0, out.extract_error or "nothing was extracted"
            return out
        value = first
    score, error, stage, key = grade_read(value, expected, sc, sc.labels or (ex.labels if ex else ()),
                                          field_value=bool(ex is not None and ex.json))
    out.score, out.score_error, out.key = score, error, key
    if ex is None or ex.regex is not None:  # the scorer read the answer (or the regex's group) itself
        out.stage = stage or out.stage
    return out


# ---- over an output ----------------------------------------------------------------------------
def tool_schemas(tools: Sequence[Any]) -> dict[str, Any]:
    out = {}
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


def score_schema(specs: Specs) -> pa.Schema:
    fields = [pa.field("row", pa.int64()), pa.field("id", pa.string()),
              pa.field("finished_at", pa.timestamp("ms", tz="UTC"))]
    if specs.extract is not None:
        fields += [pa.field(c, pa.string()) for c in specs.extract.columns]
        fields.append(pa.field("extract_error", pa.string()))
    if specs.extract is not None or (specs.score is not None and specs.score.method in ("numeric", "label", "json_field")):
        fields.append(pa.field("extract_stage", pa.string()))
    if specs.tools:
        fields += [pa.field("tool_calls_valid", pa.bool_()), pa.field("tool_calls_error", pa.string())]
    if specs.score is not None:
        fields += [pa.field("expected", pa.string()), pa.field("score", pa.float64()), pa.field("score_error", pa.string()),
                   pa.field("answer_key", pa.string())]
        if specs.score.method == "model":
            fields += [pa.field("grade_explanation", pa.string()), pa.field("grade_reasoning", pa.string())]
    return pa.schema(fields)


def score_output(out: Path, specs: Specs, grades: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``OUTPUT/_scores.parquet`` (atomically, a part at a time); a summary of what was
    scored. ``grades``: the model grader's verdicts by content key (see :mod:`.grader`); read
    from the output when not given."""
    out = Path(out)
    target = out / SCORES
    if specs.empty:
        target.unlink(missing_ok=True)
        return {"rows": 0}
    schema = score_schema(specs)
    schemas = tool_schemas(specs.tools)
    sc = specs.score
    expected_col = kept_column_name(sc.expected) if sc else None
    question_col = kept_column_name(sc.question) if sc and sc.question else None
    columns = ["row", "id", "status", "content", "tool_calls", "finished_at"] + \
        [c for c in (expected_col, question_col) if c]
    if sc is not None and sc.method == "model" and grades is None:
        from .grader import known_grades

        grades = known_grades(out)
    tmp = target.with_name(f".{target.name}.tmp")
    # right: the score of rows answered ok (the headline accuracy counts every other row as wrong);
    # decidable: rows with an expected value
    counts = {"rows": 0, "scored": 0, "score_sum": 0.0, "extract_errors": 0, "right": 0.0, "decidable": 0}
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for t in parts.iter_newest(out, columns, journal=True):
            data: dict[str, list[Any]] = {name: [] for name in schema.names}
            cols = {c: t.column(c).to_pylist() for c in columns if c != "finished_at"}
            for i in range(t.num_rows):
                expected = cols[expected_col][i] if expected_col else None
                r = score_row(cols["status"][i], cols["content"][i], cols["tool_calls"][i], expected, specs, schemas,
                              question=cols[question_col][i] if question_col else None, grades=grades)
                data["row"].append(cols["row"][i])
                data["id"].append(cols["id"][i])
                if specs.extract is not None:
                    for c in specs.extract.columns:
                        data[c].append(r.extracted.get(c))
                    data["extract_error"].append(r.extract_error)
                    counts["extract_errors"] += r.extract_error is not None
                if "extract_stage" in data:
                    data["extract_stage"].append(r.stage)
                if specs.tools:
                    data["tool_calls_valid"].append(r.tool_calls_valid)
                    data["tool_calls_error"].append(r.tool_calls_error)
                if sc is not None:
                    data["expected"].append(expected)
                    data["score"].append(r.score)
                    data["score_error"].append(r.score_error)
                    data["answer_key"].append(r.key)
                    if sc.method == "model":
                        data["grade_explanation"].append(r.grade_explanation)
                        data["grade_reasoning"].append(r.grade_reasoning)
                    if r.score is not None:
                        counts["scored"] += 1
                        counts["score_sum"] += r.score
                        if cols["status"][i] == "ok":
                            counts["right"] += r.score
                    counts["decidable"] += (expected is not None and expected != ""
                                            and not (r.score_error or "").startswith(NOT_GRADED))
            arrays = []
            for f in schema:
                if f.name == "finished_at":
                    arrays.append(t.column("finished_at").cast(f.type))
                else:
                    arrays.append(pa.array(data[f.name], type=f.type))
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            counts["rows"] += t.num_rows
    os.replace(tmp, target)
    fsync_dir(out)
    return counts
