"""What a person wants to know after a run (``batchkimi report``): it reads an output
directory (its parts and, for a run that did not finish, its journal), never the network.

:func:`report` gives rows by status, errors by type with an example each, finish reasons,
tokens (prompt, cached, completion, and the share of the answer spent reasoning), the cost
estimate, latency and time-to-first-token percentiles, retries and 429s, and, for a scored run,
accuracy overall and by group with 95% confidence intervals, and for a label job the labelling
metrics (:mod:`.labels`).

**Accuracy** counts every row of the input: a row that failed, was refused, was truncated, was
never written (a killed run) or whose answer could not be read is wrong. Only a row without an
expected value is left out (it cannot be decided; ``no_expected`` says how many). The figure over
the scored rows alone is ``accuracy_scored``. How two runs differ is :mod:`.compare`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..errors import OutputError
from ..output.parts import iter_newest
from ..output.results import kept_column_name
from ..output.sink import Sink, read_results
from ..scoring.score import NOT_GRADED
from ..stats import wilson
from ..version import __version__
from .labels import label_lines, label_metrics

SCHEMA_VERSION = 2  # of report --json: a key that does not apply is null, never absent

_BASE = ["id", "row", "status", "finish_reason", "error_type", "error_message", "prompt_tokens", "completion_tokens",
         "cached_tokens", "cost_usd", "latency_s", "ttft_s", "attempts", "model"]
_SCORE = ["score", "score_error", "extract_error", "tool_calls_valid", "extracted", "sample", "answer_key"]


def output_manifest(out: Path) -> dict[str, Any]:
    """The output's manifest, or {} where there is none (or it cannot be read)."""
    try:
        return Sink(out).read_manifest() or {}
    except OutputError:
        return {}


def _pct(values: np.ndarray) -> dict[str, float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "max": round(float(values.max()), 4), "n": int(len(values))}


def _interval(values: np.ndarray) -> tuple[float, float]:
    """95% interval of a mean score: Wilson's for right/wrong scores, else the normal one."""
    if set(np.unique(values)) <= {0.0, 1.0}:
        return wilson(float(values.sum()), len(values))
    return _mean_ci(values)


def _accuracy(scores: Any) -> dict[str, Any] | None:
    s = scores.dropna().astype(float).to_numpy()
    n = int(len(s))
    if not n:
        return None
    low, high = _interval(s)
    return {"accuracy": round(float(s.sum()) / n, 4), "ci95": [round(low, 4), round(high, 4)], "scored": n}


def _headline(df: Any, expected_col: str | None, missing_rows: int = 0) -> dict[str, Any] | None:
    """Accuracy over every row (see the module docstring): ``df`` the rows written, with
    ``status`` and ``score``; ``missing_rows`` rows of the input never written (wrong)."""
    if "score" not in df.columns:
        return None
    decidable = df
    if expected_col is not None and expected_col in df.columns:
        values = df[expected_col]
        decidable = df[values.notna() & (values.astype(str) != "")]
    if "score_error" in decidable.columns:  # an answer the model grader has not graded yet is undecided, not wrong
        decidable = decidable[~decidable["score_error"].fillna("").astype(str).str.startswith(NOT_GRADED)]
    values = np.where((decidable["status"] == "ok").to_numpy() & decidable["score"].notna().to_numpy(),
                      decidable["score"].fillna(0).astype(float).to_numpy(), 0.0)
    values = np.concatenate([values, np.zeros(max(0, missing_rows))])
    n = len(values)
    if not n:
        return None
    k = float(values.sum())
    low, high = _interval(values)
    return {"accuracy": round(k / n, 4), "ci95": [round(low, 4), round(high, 4)], "rows": n, "correct": round(k, 4),
            "scored": int(decidable["score"].notna().sum()), "no_expected": int(len(df) - len(decidable))}


def _mean_ci(x: np.ndarray) -> tuple[float, float]:
    m = float(x.mean())
    half = 1.959964 * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 1.0
    return m - half, m + half


def report(output: str | Path, results: Any = None) -> dict[str, Any]:
    """The report of one output directory as plain data (what ``--json`` prints). ``results``:
    the output's rows already read (:func:`~batchkimi.output.sink.read_results`), if the caller has them."""
    out = Path(output)
    manifest = output_manifest(out)
    job = manifest.get("job") or {}
    score_spec = job.get("score") or {}
    expected_col = kept_column_name(score_spec["expected"]) if score_spec.get("expected") else None
    labels = _labels(job)
    columns = _BASE + _SCORE + [kept_column_name(c) for c in _group_columns(manifest)] + ([expected_col] if expected_col else [])
    if labels and score_spec.get("method") == "label" and not (job.get("extract") or {}).get("labels"):
        columns.append("content")  # the label is read from the answer itself
    df = read_results(out, columns=columns) if results is None else results[[c for c in columns if c in results.columns]]
    n = len(df)
    input_rows = expected_rows(manifest)
    missing = max(0, int(input_rows) - n) if isinstance(input_rows, int) else 0
    state = manifest.get("state")
    status = df["status"].value_counts().to_dict() if n else {}
    errors = []
    if n:
        failed = df[df["status"] != "ok"]
        for etype, group in failed.groupby(failed["error_type"].fillna("(none)")):
            first = group.iloc[0]
            errors.append({"error_type": etype, "rows": int(len(group)), "example_id": str(first["id"]),
                           "example": str(first["error_message"] or "")[:300]})
        errors.sort(key=lambda e: -e["rows"])
    prompt = int(df["prompt_tokens"].fillna(0).sum()) if n else 0
    completion = int(df["completion_tokens"].fillna(0).sum()) if n else 0
    cached = int(df["cached_tokens"].fillna(0).sum()) if n else 0
    reasoning_chars = sum(int(pc.sum(pc.utf8_length(t.column("reasoning_content"))).as_py() or 0)
                          for t in iter_newest(out, ["row", "reasoning_content"], journal=True))
    answered = df[df["status"].isin(["ok", "truncated"])] if n else df
    runs = manifest.get("runs", [])
    out_dict: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "output": str(out),
        "state": state,
        "finished": state == "finished",
        "partial": bool(missing) or state != "finished",
        "input_rows": input_rows if isinstance(input_rows, int) else None,
        "rows": n,
        "status": {str(k): int(v) for k, v in status.items()},
        "errors": errors,
        "finish_reasons": {str(k): int(v) for k, v in (df["finish_reason"].value_counts().to_dict().items() if n else [])},
        "tokens": {
            "prompt": prompt, "cached": cached, "completion": completion,
            # characters of reasoning / 4: an estimate (Kimi reports no reasoning token count)
            "reasoning_share": round(min(1.0, (reasoning_chars / 4) / completion), 3) if completion else None,
            "per_answered_row": round((prompt + completion) / len(answered), 1) if len(answered) else None,
        },
        "cost_usd": {
            "total": round(float(df["cost_usd"].fillna(0).sum()), 6) if n else 0.0,
            "rows_without_cost": int((answered["cost_usd"].isna()).sum()) if len(answered) else 0,
            "estimate": True,
            "prices": manifest.get("job", {}).get("prices"),
        },
        "latency_s": _pct(answered["latency_s"].astype(float).to_numpy()) if len(answered) else None,
        "ttft_s": _pct(answered["ttft_s"].astype(float).to_numpy()) if len(answered) else None,
        "retries": int((df["attempts"].fillna(0) - 1).clip(lower=0).sum()) if n else 0,
        "rate_limited_429s": int(sum(r.get("rate_limited", 0) or 0 for r in runs)),
        "runs": len(runs),
    }
    out_dict.update({"accuracy": None, "accuracy_scored": None, "unscored": None, "no_expected": None, "by_group": None,
                     "labels": None, "samples": None, "grader": None, "extract_errors": None, "tool_calls_valid": None})
    k = job.get("samples") or 1
    if "score" in df.columns and isinstance(k, int) and k > 1:
        out_dict["samples"] = sample_metrics(df, k, expected_col)
    if "score" in df.columns:
        out_dict["accuracy"] = _headline(df, expected_col, missing)
        out_dict["accuracy_scored"] = _accuracy(df["score"])
        out_dict["unscored"] = int(df["score"].isna().sum()) + missing
        out_dict["no_expected"] = out_dict["accuracy"]["no_expected"] if out_dict["accuracy"] else None
        out_dict["by_group"] = {}
        for col in map(kept_column_name, _group_columns(manifest)):
            if col in df.columns:
                out_dict["by_group"][col] = {
                    str(value): _headline(group, expected_col) for value, group in df.groupby(df[col].fillna("(none)"))
                }
    if labels and expected_col and expected_col in df.columns:
        if "extracted" in df.columns:
            predicted = df["extracted"].where(df["status"] == "ok", None).tolist()
        else:
            from ..scoring.extract import read_label

            predicted = [read_label(c, labels).value if st == "ok" and isinstance(c, str) else None
                         for st, c in zip(df["status"], df.get("content", [None] * n), strict=True)]
        from ..scoring.extract import normalize

        spelled = {normalize(x): x for x in labels}  # a gold value as the job spells its label
        gold = [None if g is None or (isinstance(g, float) and math.isnan(g)) else spelled.get(normalize(str(g)), str(g))
                for g in df[expected_col].tolist()]
        out_dict["labels"] = label_metrics(gold, predicted, labels)
    grader_runs = sorted((out / "_grader").glob("run-*")) if (out / "_grader").is_dir() else []
    if grader_runs:  # the model grader's own requests: tokens and cost beside the answers'
        g = [read_results(p, columns=["status", "prompt_tokens", "completion_tokens", "cost_usd"], scores=False) for p in grader_runs]
        out_dict["grader"] = {
            "requests": int(sum(len(x) for x in g)),
            "tokens": int(sum(x["prompt_tokens"].fillna(0).sum() + x["completion_tokens"].fillna(0).sum() for x in g)),
            "cost_usd": round(float(sum(x["cost_usd"].fillna(0).sum() for x in g)), 6),
        }
    if "extract_error" in df.columns:
        out_dict["extract_errors"] = int(df.loc[df["status"] == "ok", "extract_error"].notna().sum())
    if "tool_calls_valid" in df.columns:
        valid = df["tool_calls_valid"].dropna()
        out_dict["tool_calls_valid"] = {"rows": int(len(valid)), "valid": int(valid.astype(bool).sum())}
    out_dict["provenance"] = provenance(manifest)
    return out_dict


def expected_rows(manifest: dict[str, Any]) -> int | None:
    """The output rows the run's job asks for: its input's rows (up to its ``limit``), times its
    samples; None when the manifest does not say."""
    job = manifest.get("job") or {}
    rows = (manifest.get("input") or {}).get("rows")
    if not isinstance(rows, int):
        return None
    samples = job.get("samples")
    limit = job.get("limit")
    return (min(rows, limit) if isinstance(limit, int) else rows) * (samples if isinstance(samples, int) and samples > 0 else 1)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k (Chen et al., 2021): the chance that at least one of k
    samples drawn from n, of which c are right, is right."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sample_metrics(df: Any, k: int, expected_col: str | None) -> dict[str, Any] | None:
    """pass@k' for every k' <= k, maj@k and per-row agreement, over the rows (ids) with an
    expected value. A sample never written, failed or unreadable is wrong; a majority vote
    that ties is undecided, so wrong, and counted under ``maj_ties``."""
    data = df
    if expected_col is not None and expected_col in df.columns:
        values = df[expected_col]
        data = df[values.notna() & (values.astype(str) != "")]
    if not len(data):
        return None
    right = (data["status"] == "ok") & (data["score"] == 1.0)
    keys = data["answer_key"] if "answer_key" in data.columns else None
    groups = data.assign(_right=right).groupby("id", sort=False)
    ids = len(groups)
    passes = {j: 0.0 for j in range(1, k + 1)}
    maj_right = ties = 0
    agreement = 0.0
    for _, g in groups:
        c = int(g["_right"].sum())
        for j in passes:
            passes[j] += pass_at_k(k, c, j)
        if keys is None:
            continue
        ok = g[(g["status"] == "ok") & g["answer_key"].notna()]
        counts = ok["answer_key"].value_counts()
        if not len(counts):
            continue
        if len(counts) > 1 and counts.iloc[0] == counts.iloc[1]:
            ties += 1
            agreement += counts.iloc[0] / k
            continue
        top = counts.index[0]
        agreement += counts.iloc[0] / k
        maj_right += bool((ok.loc[ok["answer_key"] == top, "score"] == 1.0).any())
    out: dict[str, Any] = {"samples": k, "rows": ids,
                           "pass_at_k": {str(j): round(v / ids, 4) for j, v in passes.items()}}
    if keys is not None:
        low, high = wilson(maj_right, ids)
        out.update({"maj_at_k": round(maj_right / ids, 4), "maj_ci95": [round(low, 4), round(high, 4)],
                    "maj_ties": ties, "agreement": round(agreement / ids, 4)})
    else:
        out.update({"maj_at_k": None, "maj_ci95": None, "maj_ties": None, "agreement": None})
    return out


def _labels(job: dict[str, Any]) -> list[str]:
    """The labels of a label job (score.labels, else extract.labels), or []."""
    score, extract = job.get("score") or {}, job.get("extract") or {}
    if score.get("method") != "label" and not extract.get("labels"):
        return []
    labels = score.get("labels") or extract.get("labels") or []
    return [labels] if isinstance(labels, str) else list(labels)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


PROMPT_KEYS = ("prompt_template", "prompt_column", "messages_column", "system", "system_column", "response_format", "tools")


def provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """Where a run's numbers come from: versions, model, the prompt's and the job's hashes
    (the job's settings, its output path aside), the input's fingerprint, the run's dates."""
    job = manifest.get("job") or {}
    runs = manifest.get("runs") or []
    return {
        "batchkimi_version": manifest.get("batchkimi_version"),
        "read_by": __version__,
        "model": job.get("model"),
        "thinking": job.get("thinking"),
        "prompt_hash": _digest({k: job.get(k) for k in PROMPT_KEYS}) if job else None,
        "scoring_hash": _digest({"extract": job.get("extract"), "score": job.get("score")}) if job else None,
        "job_hash": _digest({k: v for k, v in job.items() if k != "output"}) if job else None,
        "input_fingerprint": (manifest.get("input") or {}).get("fingerprint"),
        "created": manifest.get("created"),
        "updated": manifest.get("updated"),
        "started": runs[0].get("started") if runs else None,
        "finished": runs[-1].get("finished") if runs else None,
        "simulated": manifest.get("simulated"),
    }


def run_state(output: str | Path) -> str | None:
    """The state the output's last run left (``finished``, ``interrupted``, ``running`` for a
    run killed or still going...), None without a manifest."""
    return output_manifest(Path(output)).get("state")


def _group_columns(manifest: dict[str, Any]) -> list[str]:
    score = (manifest.get("job") or {}).get("score") or {}
    groups = score.get("group_by") or []
    return [groups] if isinstance(groups, str) else list(groups)


def report_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['output']}: {r['rows']} rows ({r['runs']} runs)"]
    if r["partial"]:
        of = f" {r['rows']} of {r['input_rows']} input rows written;" if r["input_rows"] is not None and r["rows"] < r["input_rows"] else ""
        lines.append(f"PARTIAL: the run did not finish (state: {r['state'] or 'unknown'});{of} rows not written count as wrong")
    lines.append("status: " + (", ".join(f"{k} {v}" for k, v in sorted(r["status"].items())) or "none"))
    if r.get("accuracy"):
        a = r["accuracy"]
        lines.append(f"accuracy: {a['accuracy']:.3f} (95% CI {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}) over all {a['rows']} rows "
                     "(failed, truncated and unreadable answers count as wrong)"
                     + (f"; {a['no_expected']} rows without an expected value left out" if a["no_expected"] else ""))
        s = r.get("accuracy_scored")
        if s:
            lines.append(f"accuracy_scored: {s['accuracy']:.3f} (95% CI {s['ci95'][0]:.3f}-{s['ci95'][1]:.3f}) over the "
                         f"{s['scored']} scored rows; {r['unscored']} unscored")
        for col, groups in (r.get("by_group") or {}).items():
            lines.append(f"accuracy by {col}:")
            for value, acc in sorted(groups.items()):
                if acc:
                    lines.append(f"  {value}: {acc['accuracy']:.3f} ({acc['ci95'][0]:.3f}-{acc['ci95'][1]:.3f}), n={acc['rows']}")
    if r.get("labels"):
        lines.extend(label_lines(r["labels"]))
    if r.get("samples"):
        s = r["samples"]
        passes = ", ".join(f"pass@{j} {v:.3f}" for j, v in s["pass_at_k"].items())
        lines.append(f"samples: {s['samples']} per row over {s['rows']} rows: {passes}")
        if s["maj_at_k"] is not None:
            lines.append(f"  maj@{s['samples']} {s['maj_at_k']:.3f} (95% CI {s['maj_ci95'][0]:.3f}-{s['maj_ci95'][1]:.3f}; "
                         f"{s['maj_ties']} tied votes counted wrong), agreement with the majority {s['agreement']:.3f}")
    if r.get("extract_errors"):
        lines.append(f"extraction failed on {r['extract_errors']} answered rows (see extract_error)")
    if r.get("tool_calls_valid"):
        t = r["tool_calls_valid"]
        lines.append(f"tool calls: {t['valid']} of {t['rows']} rows with calls had arguments valid against their schema")
    if r["errors"]:
        lines.append("errors by type:")
        for e in r["errors"][:10]:
            lines.append(f"  {e['rows']}x {e['error_type']}  e.g. {e['example_id']}: {e['example'][:120]}")
    if r["finish_reasons"]:
        lines.append("finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(r["finish_reasons"].items())))
    t = r["tokens"]
    share = f", about {t['reasoning_share']:.0%} of completion spent reasoning" if t["reasoning_share"] is not None else ""
    lines.append(f"tokens: prompt {t['prompt']:,} (cached {t['cached']:,}), completion {t['completion']:,}{share}")
    c = r["cost_usd"]
    lines.append(f"cost: ${c['total']:.4f} (an estimate at the job's prices)"
                 + (f"; unknown for {c['rows_without_cost']} rows" if c["rows_without_cost"] else ""))
    for key, label in (("latency_s", "latency"), ("ttft_s", "time to first token")):
        p = r.get(key)
        if p:
            lines.append(f"{label}: p50 {p['p50']:.2f}s, p90 {p['p90']:.2f}s, p99 {p['p99']:.2f}s, max {p['max']:.2f}s")
    lines.append(f"retries {r['retries']}, 429s {r['rate_limited_429s']}")
    if r.get("grader"):
        g = r["grader"]
        lines.append(f"model grader: {g['requests']} grading requests, {g['tokens']:,} tokens, ${g['cost_usd']:.4f} (estimate)")
    return lines


