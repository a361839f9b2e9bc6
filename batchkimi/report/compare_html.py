"""``batchkimi compare BEFORE AFTER --html FILE``: the comparison as one self-contained page: what
differs between the runs (before any number), the figures before and after, each gate's verdict,
and a browser of the rows whose score flipped, with both answers side by side."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..output.results import kept_column_name
from ..output.sink import read_results
from .html import _page
from .report import output_manifest

_ROWS = (("accuracy", "accuracy"), ("error_rate", "error rate"), ("latency_p50_s", "latency p50 (s)"),
         ("tokens_per_row", "tokens per row"), ("cost_usd", "cost (USD, est.)"))


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def _answers(out: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The flipped rows' answers and scores in one run, by id."""
    if not ids:
        return {}
    score = ((output_manifest(out).get("job") or {}).get("score") or {})
    expected = kept_column_name(score["expected"]) if score.get("expected") else None
    cols = ["id", "status", "content", "score", "score_error", "error_message"] + ([expected] if expected else [])
    df = read_results(out, columns=cols)
    df = df[df["id"].astype(str).isin(set(ids))]
    return {str(r["id"]): {**r.to_dict(), "expected": r.get(expected) if expected else None} for _, r in df.iterrows()}


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "<td class='muted'>not in this run</td>"
    text = r.get("content") if isinstance(r.get("content"), str) else r.get("error_message") or ""
    score = r.get("score")
    mark = "" if score is None or score != score else (" ✓" if score == 1 else " ✗")
    status = "" if r.get("status") == "ok" else f"<span class='bad'>{html.escape(str(r.get('status')))}</span> "
    return f"<td>{status}<b>{mark}</b> {html.escape(str(text)[:600])}</td>"


def write_compare_html(c: dict[str, Any], dest: str | Path, limit: int = 200) -> Path:
    """Write the comparison page of ``c`` (what :func:`~batchkimi.report.compare.compare` returned,
    with its ``gates``) to ``dest``."""
    dest = Path(dest)
    a, b, d = c["runs"]["before"], c["runs"]["after"], c["difference"]
    parts = [f"<h1>batchkimi compare</h1><p>before: {html.escape(c['before'])} ({a['rows']} rows)<br>"
             f"after: {html.escape(c['after'])} ({b['rows']} rows)</p>"]
    parts += [f"<p class='bad'><b>Warning:</b> {html.escape(m)}</p>" for m in c["mismatches"]]
    parts.append("<table><tr><th></th><th>before</th><th>after</th><th>change</th></tr>" + "".join(
        f"<tr><th>{label}</th><td>{_fmt(a[k])}</td><td>{_fmt(b[k])}</td>"
        f"<td>{'n/a' if d.get(k) is None else f'{d[k]:+.4f}'}</td></tr>" for k, label in _ROWS) + "</table>")
    gates = c.get("gates") or []
    if gates:
        parts.append("<h2>Gates</h2><table>" + "".join(
            f"<tr><th>{html.escape(g['name'])}</th><td class='{'' if g['passed'] else 'bad'}'>{'pass' if g['passed'] else 'FAIL'}"
            f"</td><td>{html.escape(g['message'])}</td></tr>" for g in gates) + "</table>")
    p = c.get("paired")
    if p:
        parts.append(f"<h2>Rows whose score flipped</h2><p>paired on {p['rows']} rows: {p['flipped_to_wrong']} right → wrong, "
                     f"{p['flipped_to_right']} wrong → right, McNemar p = {p['mcnemar_p']:.4f}</p>")
        for title, ids, total in (("Now wrong", p["examples_to_wrong"], p["flipped_to_wrong"]),
                                  ("Now right", p["examples_to_right"], p["flipped_to_right"])):
            ids = ids[:limit]
            if not ids:
                continue
            before, after = _answers(Path(c["before"]), ids), _answers(Path(c["after"]), ids)
            rows = "".join(
                f"<tr><td>{html.escape(i)}</td><td>{html.escape(str((after.get(i) or before.get(i) or {}).get('expected') or ''))}</td>"
                f"{_cell(before.get(i))}{_cell(after.get(i))}</tr>" for i in ids)
            parts.append(f"<h3>{title} ({len(ids)} of {total} shown)</h3><table><tr><th>id</th><th>expected</th><th>before</th>"
                         f"<th>after</th></tr>{rows}</table>")
    dest.write_text(_page("batchkimi compare", "".join(parts)), encoding="utf-8")
    return dest


def write_trend_html(t: dict[str, Any], dest: str | Path) -> Path:
    """Write the trend of ``t`` (what :func:`~batchkimi.report.compare.trend` returned): accuracy
    over the runs with its 95% interval, error rate and cost, and the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .html import _svg

    dest = Path(dest)
    runs = t["runs"]
    names = [r["run"] for r in runs]
    parts = [f"<h1>batchkimi trend: {html.escape(t['folder'])}</h1>"]
    scored = [(i, r) for i, r in enumerate(runs) if r["accuracy"] is not None and r["accuracy_ci95"]]
    plots = []
    if scored:
        fig, ax = plt.subplots(figsize=(5.2, 3))
        xs = [i for i, _ in scored]
        acc = [r["accuracy"] for _, r in scored]
        low = [r["accuracy"] - r["accuracy_ci95"][0] for _, r in scored]
        high = [r["accuracy_ci95"][1] - r["accuracy"] for _, r in scored]
        ax.errorbar(xs, acc, yerr=[low, high], marker="o", capsize=3, color="#e69138")
        for x, a in zip(xs, acc, strict=True):
            ax.annotate(f"{a:.3f}", (x, a), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_xlim(-0.5, len(names) - 0.3)
        ax.set_ylabel("accuracy (95% CI)")
        plots.append(("Accuracy", _svg(fig)))
    fig, ax = plt.subplots(figsize=(5.2, 3))
    errors = [r["error_rate"] or 0.0 for r in runs]
    ax.plot(range(len(names)), errors, marker="o", color="#cc0000")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(0, max(0.05, max(errors) * 1.2))
    ax.set_ylabel("share of rows failed")
    plots.append(("Error rate", _svg(fig)))
    parts.append("<div class='plots'>" + "".join(f"<div class='plot'><h3>{n}</h3>{svg}</div>" for n, svg in plots) + "</div>")
    rows = []
    for r in runs:
        ci = r["accuracy_ci95"]
        acc_text = f"{r['accuracy']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if r["accuracy"] is not None and ci else "-"
        flags = ("PARTIAL " if r["partial"] else "") + "; ".join(r["mismatches"])
        rows.append(f"<tr><td>{html.escape(r['run'])}</td><td>{r['rows']}</td><td>{acc_text}</td><td>{_fmt(r['error_rate'])}</td>"
                    f"<td>{_fmt(r['latency_p50_s'])}</td><td>{_fmt(r['cost_usd'])}</td><td class='bad'>{html.escape(flags)}</td></tr>")
    parts.append("<table><tr><th>run</th><th>rows</th><th>accuracy (95% CI)</th><th>error rate</th><th>latency p50 (s)</th>"
                 "<th>cost (USD)</th><th></th></tr>" + "".join(rows) + "</table>")
    dest.write_text(_page(f"batchkimi trend {t['folder']}", "".join(parts)), encoding="utf-8")
    return dest
