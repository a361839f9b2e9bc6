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
