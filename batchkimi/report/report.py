"""What a person wants to know after a run (``batchkimi report``), and how two runs differ
(``batchkimi compare``): both read an output directory, never the network.

:func:`report` gives rows by status, errors by type with an example each, finish reasons,
tokens (prompt, cached, completion, and the share of the answer spent reasoning), the cost
estimate, latency and time-to-first-token percentiles, retries and 429s, and, for a scored run,
accuracy overall and by group with 95% confidence intervals.

:func:`compare` pairs two runs' rows by id: the aggregate differences, the rows whose score
flipped, McNemar's test on them and the paired difference's confidence interval, so that one
noisy night is not read as a regression; :func:`regressions` turns thresholds into a verdict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..errors import OutputError
from ..output.parts import iter_newest
from ..output.results import kept_column_name
from ..output.sink import Sink, read_results
from ..stats import wilson

_BASE = ["id", "row", "status", "finish_reason", "error_type", "error_message", "prompt_tokens", "completion_tokens",
         "cached_tokens", "cost_usd", "latency_s", "ttft_s", "attempts", "model"]
_SCORE = ["score", "score_error", "extract_error", "tool_calls_valid"]


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


def _accuracy(scores: Any) -> dict[str, Any] | None:
    s = scores.dropna().astype(float)
    n = int(len(s))
    if not n:
        return None
    k = float(s.sum())
    low, high = wilson(k, n) if set(s.unique()) <= {0.0, 1.0} else _mean_ci(s.to_numpy())
    return {"accuracy": round(k / n, 4), "ci95": [round(low, 4), round(high, 4)], "scored": n}


def _mean_ci(x: np.ndarray) -> tuple[float, float]:
    m = float(x.mean())
    half = 1.959964 * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 1.0
    return m - half, m + half


def report(output: str | Path, results: Any = None) -> dict[str, Any]:
    """The report of one output directory as plain data (what ``--json`` prints). ``results``:
    the output's rows already read (:func:`~batchkimi.output.sink.read_results`), if the caller has them."""
    out = Path(output)
    manifest = output_manifest(out)
    columns = _BASE + _SCORE + [kept_column_name(c) for c in _group_columns(manifest)]
    df = read_results(out, columns=columns) if results is None else results[[c for c in columns if c in results.columns]]
    n = len(df)
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
                          for t in iter_newest(out, ["row", "reasoning_content"]))
    answered = df[df["status"].isin(["ok", "truncated"])] if n else df
    runs = manifest.get("runs", [])
    out_dict: dict[str, Any] = {
        "output": str(out),
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
    if "score" in df.columns:
        out_dict["accuracy"] = _accuracy(df["score"])
        out_dict["unscored"] = int(df["score"].isna().sum())
        out_dict["by_group"] = {}
        for col in map(kept_column_name, _group_columns(manifest)):
            if col in df.columns:
                out_dict["by_group"][col] = {
                    str(value): _accuracy(group["score"]) for value, group in df.groupby(df[col].fillna("(none)"))
                }
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
    return out_dict


def _group_columns(manifest: dict[str, Any]) -> list[str]:
    score = (manifest.get("job") or {}).get("score") or {}
    groups = score.get("group_by") or []
    return [groups] if isinstance(groups, str) else list(groups)


def report_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['output']}: {r['rows']} rows ({r['runs']} runs)"]
    lines.append("status: " + (", ".join(f"{k} {v}" for k, v in sorted(r["status"].items())) or "none"))
    if r.get("accuracy"):
        a = r["accuracy"]
        lines.append(f"accuracy: {a['accuracy']:.3f} (95% CI {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}) over {a['scored']} "
                     f"scored rows; {r['unscored']} unscored")
        for col, groups in (r.get("by_group") or {}).items():
            lines.append(f"accuracy by {col}:")
            for value, acc in sorted(groups.items()):
                if acc:
                    lines.append(f"  {value}: {acc['accuracy']:.3f} ({acc['ci95'][0]:.3f}-{acc['ci95'][1]:.3f}), n={acc['scored']}")
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


# ---- two runs ----------------------------------------------------------------------------------
def mcnemar_p(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's test on b and c discordant pairs: exact (binomial) up to
    a few thousand pairs, else the chi-square approximation with continuity correction."""
    n = b + c
    if n == 0:
        return 1.0
    if n <= 5000:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        return min(1.0, 2 * tail)
    chi = (abs(b - c) - 1) ** 2 / n
    return math.erfc(math.sqrt(chi / 2))


def _summary(df: Any) -> dict[str, Any]:
    n = len(df)
    answered = df[df["status"].isin(["ok", "truncated"])]
    acc = _accuracy(df["score"]) if "score" in df.columns else None
    lat = answered["latency_s"].astype(float).to_numpy() if len(answered) else np.zeros(0)
    return {
        "rows": n,
        "accuracy": acc["accuracy"] if acc else None,
        "error_rate": round(float((df["status"] != "ok").mean()), 4) if n else None,
        "latency_p50_s": round(float(np.median(lat)), 4) if len(lat) else None,
        "tokens_per_row": round(float((df["prompt_tokens"].fillna(0) + df["completion_tokens"].fillna(0)).mean()), 1) if n else None,
        "cost_usd": round(float(df["cost_usd"].fillna(0).sum()), 6),
    }


def compare(before: str | Path, after: str | Path, *, show: int = 20) -> dict[str, Any]:
    cols = ["id", "status", "latency_s", "prompt_tokens", "completion_tokens", "cost_usd", "score"]
    a, b = (read_results(p, columns=cols) for p in (before, after))
    out: dict[str, Any] = {"before": str(before), "after": str(after), "runs": {"before": _summary(a), "after": _summary(b)}}
    out["difference"] = {k: (round(out["runs"]["after"][k] - out["runs"]["before"][k], 6)
                             if out["runs"]["after"][k] is not None and out["runs"]["before"][k] is not None else None)
                         for k in out["runs"]["before"] if k != "rows"}
    if "score" in a.columns and "score" in b.columns:
        pair = a[["id", "score"]].merge(b[["id", "score"]], on="id", suffixes=("_before", "_after")).dropna()
        x, y = pair["score_before"].astype(float).to_numpy(), pair["score_after"].astype(float).to_numpy()
        worse = pair[(x > y)]
        better = pair[(x < y)]
        d = y - x
        n = len(d)
        half = 1.959964 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
        out["paired"] = {
            "rows": n,
            "accuracy_difference": round(float(d.mean()), 4) if n else None,
            "ci95": [round(float(d.mean()) - half, 4), round(float(d.mean()) + half, 4)] if n > 1 else None,
            "mcnemar_p": round(mcnemar_p(len(worse), len(better)), 6),
            "flipped_to_wrong": len(worse),
            "flipped_to_right": len(better),
            "examples_to_wrong": worse["id"].astype(str).head(show).tolist(),
            "examples_to_right": better["id"].astype(str).head(show).tolist(),
        }
    return out


def regressions(c: dict[str, Any], *, max_accuracy_drop: float | None, max_error_rate_rise: float | None,
                significant: bool = False, alpha: float = 0.05) -> list[str]:
    """What fails the comparison: each threshold passed (only when significant, if asked)."""
    found = []
    diff = c["difference"]
    paired = c.get("paired")
    if max_accuracy_drop is not None and diff.get("accuracy") is not None and -diff["accuracy"] > max_accuracy_drop:
        sig = paired is not None and paired["mcnemar_p"] < alpha
        if not significant or sig:
            p = f" (McNemar p={paired['mcnemar_p']:.4f})" if paired else ""
            found.append(f"accuracy fell by {-diff['accuracy']:.4f}, more than {max_accuracy_drop}{p}")
    if max_error_rate_rise is not None and diff.get("error_rate") is not None and diff["error_rate"] > max_error_rate_rise:
        found.append(f"the error rate rose by {diff['error_rate']:.4f}, more than {max_error_rate_rise}")
    return found


def compare_lines(c: dict[str, Any]) -> list[str]:
    a, b, d = c["runs"]["before"], c["runs"]["after"], c["difference"]
    lines = [f"before: {c['before']} ({a['rows']} rows)", f"after:  {c['after']} ({b['rows']} rows)"]

    def fmt(v: Any, spec: str = ".4f") -> str:
        return "-" if v is None else format(v, spec)

    for key, label in (("accuracy", "accuracy"), ("error_rate", "error rate"), ("latency_p50_s", "latency p50 (s)"),
                       ("tokens_per_row", "tokens per row"), ("cost_usd", "cost (USD, est.)")):
        lines.append(f"  {label:18} {fmt(a[key]):>10} -> {fmt(b[key]):>10}  ({'+' if (d.get(key) or 0) >= 0 else ''}{fmt(d.get(key))})")
    p = c.get("paired")
    if p:
        ci = f"{p['ci95'][0]:+.4f} to {p['ci95'][1]:+.4f}" if p["ci95"] else "-"
        lines.append(f"paired on {p['rows']} rows: accuracy {p['accuracy_difference']:+.4f} (95% CI {ci}); "
                     f"{p['flipped_to_wrong']} right -> wrong, {p['flipped_to_right']} wrong -> right; McNemar p = {p['mcnemar_p']:.4f}")
        if p["examples_to_wrong"]:
            lines.append("  now wrong: " + ", ".join(p["examples_to_wrong"]))
        if p["examples_to_right"]:
            lines.append("  now right: " + ", ".join(p["examples_to_right"]))
    return lines


def latest_two(folder: str | Path) -> tuple[Path, Path]:
    """The two most recent run outputs under ``folder`` (by their manifest's creation time)."""
    runs = []
    for p in Path(folder).iterdir():
        m = output_manifest(p) if p.is_dir() else {}
        if m:
            runs.append((str(m.get("created", "")), p.name, p))
    if len(runs) < 2:
        raise FileNotFoundError(f"{folder} holds {len(runs)} run output(s); compare needs two")
    runs.sort()
    return runs[-2][2], runs[-1][2]
