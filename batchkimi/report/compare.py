"""How two runs differ (``batchkimi compare``), and how a series of nightly runs moves
(``batchkimi trend``): they read output directories, never the network.

:func:`compare` pairs two runs' rows by id: the aggregate differences (accuracy over every row,
see :mod:`.report`), the rows whose score flipped, McNemar's test on them and the paired
difference's confidence interval, so that one noisy night is not read as a regression;
:func:`gates` turns thresholds into verdicts. A comparison that cannot be made (a run
with no rows, no row shared, a gate on accuracy over an unscored run) raises
:class:`CannotCompare`, never passes; two runs of different inputs, prompts, models or scoring
are named in ``mismatches`` before any number.
"""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import JobError
from ..output.results import kept_column_name
from ..output.sink import check_output, read_results
from ..storage.location import is_url
from ..storage.remote import runs_under
from .report import _headline, expected_rows, output_manifest, provenance


class CannotCompare(JobError):
    """Two runs that cannot be compared, and why (one line)."""


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


def _read(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(rows, manifest, summary) of one run."""
    manifest = output_manifest(path)
    score = ((manifest.get("job") or {}).get("score") or {})
    expected_col = kept_column_name(score["expected"]) if score.get("expected") else None
    cols = ["id", "status", "latency_s", "prompt_tokens", "completion_tokens", "cost_usd", "score", "score_error", "sample"] + \
        ([expected_col] if expected_col else [])
    df = read_results(path, columns=cols)
    n = len(df)
    input_rows = expected_rows(manifest)
    missing = max(0, int(input_rows) - n) if isinstance(input_rows, int) else 0
    answered = df[df["status"].isin(["ok", "truncated"])]
    head = _headline(df, expected_col, missing) if n else None
    lat = answered["latency_s"].astype(float).to_numpy() if len(answered) else np.zeros(0)
    lat = lat[~np.isnan(lat)]
    state = manifest.get("state")
    summary = {
        "rows": n,
        "input_rows": input_rows if isinstance(input_rows, int) else None,
        "state": state,
        "partial": bool(missing) or state != "finished",
        "scored": bool(head and head["scored"]),
        "accuracy": head["accuracy"] if head and head["scored"] else None,
        "accuracy_ci95": head["ci95"] if head and head["scored"] else None,
        "error_rate": round(float((df["status"] != "ok").sum() + missing) / (n + missing), 4) if n + missing else None,
        "latency_p50_s": round(float(np.median(lat)), 4) if len(lat) else None,
        "tokens_per_row": round(float((df["prompt_tokens"].fillna(0) + df["completion_tokens"].fillna(0)).mean()), 1) if n else None,
        "cost_usd": round(float(df["cost_usd"].fillna(0).sum()), 6) if n else 0.0,
        "samples": (manifest.get("job") or {}).get("samples") or 1,
        "provenance": provenance(manifest),
    }
    return df, manifest, summary


_CHECKED = (("input_fingerprint", "the input"), ("prompt_hash", "the prompt"), ("model", "the model"),
            ("thinking", "thinking"), ("scoring_hash", "the scoring ([extract] and [score])"))


def mismatches(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two runs' provenance that makes their numbers not comparable."""
    found = []
    for key, what in _CHECKED:
        a, b = before.get(key), after.get(key)
        if a is not None and b is not None and a != b:
            shown = f": {a} -> {b}" if key in ("model", "thinking") else ""
            found.append(f"{what} differs between the runs{shown}")
    return found


def compare(before: str | Path, after: str | Path, *, show: int = 20) -> dict[str, Any]:
    """The comparison as plain data (what ``--json`` prints); CannotCompare when it cannot be made."""
    before, after = Path(before), Path(after)
    a, _, sa = _read(before)
    b, _, sb = _read(after)
    for path, s in ((before, sa), (after, sb)):
        if not s["rows"]:
            raise CannotCompare(f"{path} has no rows (state: {s['state'] or 'no manifest'}): the run wrote nothing to compare")
    shared = len(set(a["id"]) & set(b["id"]))
    if not shared:
        raise CannotCompare(f"{before} and {after} share no row id: they are not runs of the same input")
    out: dict[str, Any] = {"before": str(before), "after": str(after), "runs": {"before": sa, "after": sb},
                           "mismatches": mismatches(sa["provenance"], sb["provenance"])}
    for name, s in (("before", sa), ("after", sb)):
        if s["partial"]:
            of = f"{s['rows']} of {s['input_rows']} rows" if s["input_rows"] is not None else f"{s['rows']} rows"
            out["mismatches"].append(f"the {name} run is partial ({of}, state: {s['state'] or 'unknown'})")
    keys = ("accuracy", "error_rate", "latency_p50_s", "tokens_per_row", "cost_usd")
    out["difference"] = {k: (round(sb[k] - sa[k], 6) if sb[k] is not None and sa[k] is not None else None) for k in keys}
    out["paired"] = None
    if sa["scored"] and sb["scored"]:
        # every shared row: a failed or unscored row is wrong (0), as in the accuracy; a row's
        # samples are averaged, and with samples a flip is the majority of them turning
        def per_row(df: Any) -> Any:
            ok = (df["status"] == "ok") & df["score"].notna()
            values = df.assign(value=np.where(ok, df["score"].fillna(0).astype(float), 0.0))[["id", "value"]]
            return values.groupby("id", as_index=False, sort=False)["value"].mean()

        pair = per_row(a).merge(per_row(b), on="id", suffixes=("_before", "_after"))
        x, y = pair["value_before"].to_numpy(), pair["value_after"].to_numpy()
        if max(sa["samples"], sb["samples"]) > 1:
            worse, better = pair[(x > 0.5) & (y <= 0.5)], pair[(x <= 0.5) & (y > 0.5)]
        else:
            worse, better = pair[x > y], pair[x < y]
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


def gates(c: dict[str, Any], *, max_accuracy_drop: float | None, max_error_rate_rise: float | None,
          significant: bool = False, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Each gate asked for, with its verdict: ``{"name", "passed", "message"}``. A gate that
    cannot be decided raises CannotCompare (an unscored run under an accuracy gate)."""
    out = []
    diff, paired = c["difference"], c.get("paired")
    if max_accuracy_drop is not None:
        unscored = [n for n in ("before", "after") if not c["runs"][n]["scored"]]
        if unscored:
            raise CannotCompare(f"--max-accuracy-drop cannot be checked: the {' and the '.join(unscored)} run has no scores "
                                "(give the job a [score], then `batchkimi score OUTPUT`)")
        drop = -diff["accuracy"]
        sig = paired is not None and paired["mcnemar_p"] < alpha
        failed = drop > max_accuracy_drop and (not significant or sig)
        p = f" (McNemar p={paired['mcnemar_p']:.4f})" if paired else ""
        message = (f"accuracy fell by {drop:.4f}, more than {max_accuracy_drop}{p}" if failed else
                   f"accuracy changed by {diff['accuracy']:+.4f} (the gate: a fall of at most {max_accuracy_drop}"
                   + (", or not significant" if significant else "") + f"){p}")
        out.append({"name": "accuracy", "passed": not failed, "message": message})
    if max_error_rate_rise is not None:
        rise = diff["error_rate"]
        failed = rise is not None and rise > max_error_rate_rise
        message = (f"the error rate rose by {rise:.4f}, more than {max_error_rate_rise}" if failed else
                   f"the error rate changed by {rise:+.4f} (the gate: a rise of at most {max_error_rate_rise})")
        out.append({"name": "error_rate", "passed": not failed, "message": message})
    return out


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


_ROWS = (("accuracy", "accuracy"), ("error_rate", "error rate"), ("latency_p50_s", "latency p50 (s)"),
         ("tokens_per_row", "tokens per row"), ("cost_usd", "cost (USD, est.)"))


def compare_lines(c: dict[str, Any]) -> list[str]:
    a, b, d = c["runs"]["before"], c["runs"]["after"], c["difference"]
    lines = [f"WARNING: {m}" for m in c["mismatches"]]
    lines += [f"before: {c['before']} ({a['rows']} rows)", f"after:  {c['after']} ({b['rows']} rows)"]
    for key, label in _ROWS:
        change = "n/a" if d.get(key) is None else f"{d[key]:+.4f}"
        lines.append(f"  {label:18} {_fmt(a[key]):>10} -> {_fmt(b[key]):>10}  ({change})")
    p = c.get("paired")
    if p:
        ci = f"{p['ci95'][0]:+.4f} to {p['ci95'][1]:+.4f}" if p["ci95"] else "-"
        lines.append(f"paired on {p['rows']} rows: accuracy {p['accuracy_difference']:+.4f} (95% CI {ci}); "
                     f"{p['flipped_to_wrong']} right -> wrong, {p['flipped_to_right']} wrong -> right; McNemar p = {p['mcnemar_p']:.4f}")
        if p["examples_to_wrong"]:
            lines.append("  now wrong: " + ", ".join(p["examples_to_wrong"]))
        if p["examples_to_right"]:
            lines.append("  now right: " + ", ".join(p["examples_to_right"]))
    elif a["scored"] != b["scored"] or not a["scored"]:
        lines.append("no accuracy to compare: " + ("neither run is scored" if not a["scored"] and not b["scored"]
                                                   else f"the {'before' if not a['scored'] else 'after'} run is not scored"))
    return lines


def markdown(c: dict[str, Any], verdicts: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown summary (for a CI job's summary page)."""
    a, b, d = c["runs"]["before"], c["runs"]["after"], c["difference"]
    failed = [g for g in verdicts if not g["passed"]]
    head = "## Regression" if failed else "## No regression"
    lines = [head, ""]
    lines += [f"> **Warning:** {m}" for m in c["mismatches"]] + ([""] if c["mismatches"] else [])
    lines += [f"Before: `{c['before']}` ({a['rows']} rows) · after: `{c['after']}` ({b['rows']} rows)", "",
              "| | before | after | change |", "|---|---:|---:|---:|"]
    for key, label in _ROWS:
        lines.append(f"| {label} | {_fmt(a[key])} | {_fmt(b[key])} | {_fmt(d.get(key), '+.4f')} |")
    p = c.get("paired")
    if p:
        lines += ["", f"Paired on {p['rows']} rows: {p['flipped_to_wrong']} right → wrong, {p['flipped_to_right']} wrong → right, "
                      f"McNemar p = {p['mcnemar_p']:.4f}."]
    if verdicts:
        lines += ["", "| gate | verdict | |", "|---|---|---|"]
        lines += [f"| {g['name']} | {'pass' if g['passed'] else '**FAIL**'} | {g['message']} |" for g in verdicts]
    return "\n".join(lines) + "\n"


def junit(c: dict[str, Any], verdicts: list[dict[str, Any]]) -> bytes:
    """The gates as JUnit XML: one test case per gate, a failure for each gate not passed."""
    import xml.etree.ElementTree as ET

    suite = ET.Element("testsuite", name="batchkimi compare", tests=str(len(verdicts)),
                       failures=str(sum(not g["passed"] for g in verdicts)), errors="0", skipped="0")
    props = ET.SubElement(suite, "properties")
    for name in ("before", "after"):
        ET.SubElement(props, "property", name=name, value=str(c[name]))
    for m in c["mismatches"]:
        ET.SubElement(props, "property", name="warning", value=m)
    for g in verdicts:
        case = ET.SubElement(suite, "testcase", classname="batchkimi.compare", name=g["name"])
        if not g["passed"]:
            ET.SubElement(case, "failure", message=g["message"], type="regression").text = g["message"]
        else:
            ET.SubElement(case, "system-out").text = g["message"]
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


# ---- a series of runs ------------------------------------------------------------------------------
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")


def run_name(run: Path | str) -> str:
    return run.name if isinstance(run, Path) else run.rstrip("/").rsplit("/", 1)[-1]


def runs_in(folder: str | Path) -> list[Path | str]:
    """The run outputs under ``folder`` (a local folder, or a folder's URL: the runs' URLs are
    returned), oldest first: by the date in their folder's name when every one has one (an
    output path with ``{date}``: a backfilled night sorts by its night), else by their
    manifest's creation time."""
    found: list[tuple[Path | str, str]] = []
    if is_url(str(folder)):
        found = [(url, str(m.get("created", ""))) for url, m in runs_under(str(folder))]
    else:
        for p in Path(folder).iterdir():
            m = output_manifest(p) if p.is_dir() else {}
            if m:
                found.append((p, str(m.get("created", ""))))
    dated = [(_DATE.search(run_name(p)), p, created) for p, created in found]
    if found and all(d is not None for d, _, _ in dated):
        def night(item: tuple[Any, Path | str, str]) -> tuple[datetime.date, str]:
            return datetime.date.fromisoformat(item[0].group(1)), item[2]

        return [p for _, p, _ in sorted(dated, key=night)]
    return [p for p, _ in sorted(found, key=lambda x: (x[1], run_name(x[0])))]


def latest_two(folder: str | Path) -> tuple[Path | str, Path | str]:
    """The two most recent run outputs under ``folder`` (see :func:`runs_in`)."""
    runs = runs_in(folder)
    if len(runs) < 2:
        raise CannotCompare(f"{folder} holds {len(runs)} run output(s); compare needs two")
    return runs[-2], runs[-1]


def trend(folder: str | Path, last: int = 7) -> dict[str, Any]:
    """The last ``last`` runs under ``folder``: accuracy with its interval, error rate, cost,
    latency, and whether each is partial or differs from the newest in what it ran."""
    runs = runs_in(folder)[-last:]
    if not runs:
        raise CannotCompare(f"{folder} holds no run output")
    summaries = [_read(p if isinstance(p, Path) else check_output(p))[2] for p in runs]
    newest = summaries[-1]["provenance"]
    rows = [{"run": run_name(p), "path": str(p), **{k: v for k, v in s.items() if k != "provenance"},
             "created": s["provenance"]["created"], "mismatches": mismatches(s["provenance"], newest)}
            for p, s in zip(runs, summaries, strict=True)]
    return {"folder": str(folder), "runs": rows}


def trend_lines(t: dict[str, Any]) -> list[str]:
    lines = [f"{'run':24} {'rows':>6} {'accuracy (95% CI)':>24} {'errors':>8} {'p50 s':>7} {'cost $':>9}"]
    for r in t["runs"]:
        ci = r["accuracy_ci95"]
        acc = f"{r['accuracy']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if r["accuracy"] is not None and ci else "-"
        flags = (" PARTIAL" if r["partial"] else "") + (" *" if r["mismatches"] else "")
        lines.append(f"{r['run'][:24]:24} {r['rows']:>6} {acc:>24} {_fmt(r['error_rate'], '.3f'):>8} "
                     f"{_fmt(r['latency_p50_s'], '.2f'):>7} {_fmt(r['cost_usd'], '.4f'):>9}{flags}")
    if any(r["mismatches"] for r in t["runs"]):
        lines.append("* ran something other than the newest run: " + "; ".join(
            f"{r['run']}: {', '.join(r['mismatches'])}" for r in t["runs"] if r["mismatches"]))
    return lines
