"""``batchkimi report OUTPUT --html FILE``: one self-contained page (no network needed to open
it): the report's figures, plots drawn by matplotlib as inline SVG (latency, tokens per row,
accuracy by group with values and n, a label job's confusion matrix, errors over time), the
rows that were not ok, and for runs with images a contact sheet, each
thumbnail (inline JPEG) beside its caption or label, paged into ``FILE-contact-N.html`` files
of :data:`PER_PAGE` items for big runs.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..output.sink import read_results
from .report import output_manifest, report

PER_PAGE = 200
SHEET_MAX = 5000  # items on the contact sheet at most (25 pages): a thumbnail costs a decode
THUMB = 160
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plot{width:520px}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:1em}
.item{border:1px solid #ddd;padding:.5em;font-size:.85em}.item img{max-width:100%;display:block;margin-bottom:.4em}
.missing{height:100px;background:#f4f4f4;color:#888;display:flex;align-items:center;justify-content:center}
.bad{color:#a00}.muted{color:#777}
"""


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plots(df: Any, rep: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = []
    answered = df[df["status"].isin(["ok", "truncated"])]
    latency = answered["latency_s"].dropna().astype(float).to_numpy()
    if len(latency):
        fig, ax = plt.subplots(figsize=(5.2, 3))
        ax.hist(latency, bins="auto", color="#4a7ebb")
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("rows")
        out.append(("Latency", _svg(fig)))
    tokens = np.sort((answered["prompt_tokens"].fillna(0) + answered["completion_tokens"].fillna(0)).to_numpy(dtype=float))
    if len(tokens):  # the share of rows at or under each size: readable however the sizes cluster
        fig, ax = plt.subplots(figsize=(5.2, 3))
        ax.step(tokens, np.arange(1, len(tokens) + 1) / len(tokens), where="post", color="#6aa84f")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("tokens per row (prompt + completion)")
        ax.set_ylabel("share of rows at or under")
        ax.grid(alpha=0.3)
        out.append(("Tokens per row", _svg(fig)))
    for col, groups in (rep.get("by_group") or {}).items():
        items = [(k, v) for k, v in sorted(groups.items()) if v]
        if not items:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 0.7 + 0.4 * len(items)))
        acc = np.array([v["accuracy"] for _, v in items])
        low = acc - np.array([v["ci95"][0] for _, v in items])
        high = np.array([v["ci95"][1] for _, v in items]) - acc
        ax.barh([str(k) for k, _ in items], acc, xerr=[low, high], color="#e69138", capsize=3)
        for i, (_, v) in enumerate(items):  # the value and n, right of the interval
            ax.text(v["ci95"][1] + 0.02, i, f"{v['accuracy']:.2f} (n={v['rows']})", va="center", fontsize=8)
        ax.set_xlim(0, 1.3)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xlabel(f"accuracy by {col} (95% CI)")
        out.append((f"Accuracy by {col}", _svg(fig)))
    labels = rep.get("labels")
    if labels:
        cm = np.array(labels["confusion_matrix"]["counts"], dtype=float)
        gold, pred = labels["confusion_matrix"]["gold"], labels["confusion_matrix"]["predicted"]
        fig, ax = plt.subplots(figsize=(1.6 + 0.8 * len(pred), 1.2 + 0.6 * len(gold)))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(pred)), pred, rotation=30, ha="right")
        ax.set_yticks(range(len(gold)), gold)
        ax.set_xlabel("answer")
        ax.set_ylabel("gold")
        top = cm.max() or 1
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
        out.append(("Confusion matrix", _svg(fig)))
    failed = df[(df["status"] != "ok") & df["finished_at"].notna()]
    if len(failed):
        fig, ax = plt.subplots(figsize=(5.2, 3))
        t = failed["finished_at"]
        span = (t.max() - t.min()).total_seconds()
        freq = "s" if span < 120 else "min" if span < 7200 else "h"
        counts = failed.groupby([t.dt.floor(freq), failed["error_type"].fillna(failed["status"])]).size().unstack(fill_value=0)
        x = np.arange(len(counts))
        bottom = np.zeros(len(counts))
        for name in counts.columns:  # bars stacked by error type, one bar per time bucket
            ax.bar(x, counts[name].to_numpy(), bottom=bottom, width=0.8, label=str(name))
            bottom += counts[name].to_numpy()
        step = max(1, len(x) // 8)
        ax.set_xticks(x[::step], [ts.strftime("%H:%M:%S") for ts in counts.index[::step]], fontsize=7)
        ax.set_xlabel(f"time (UTC, per {freq})")
        ax.set_ylabel("failed rows")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        out.append(("Errors over time", _svg(fig)))
    return out


def _failures_table(df: Any, limit: int = 200) -> str:
    """The rows behind the error counts: id, status, error and its message, the first ``limit``."""
    failed = df[df["status"] != "ok"]
    if not len(failed):
        return ""
    cells = []
    for _, r in failed.head(limit).iterrows():
        cells.append(f"<tr><td>{html.escape(str(r['id']))}</td><td>{html.escape(str(r['status']))}</td>"
                     f"<td>{html.escape(str(r.get('error_type') or ''))}</td>"
                     f"<td>{html.escape(str(r.get('error_message') or '')[:300])}</td></tr>")
    more = f" (the first {limit} of {len(failed)})" if len(failed) > limit else ""
    return (f"<h2>Rows not ok{more}</h2><table><tr><th>id</th><th>status</th><th>error</th><th>message</th></tr>"
            + "".join(cells) + "</table>")


def _media_root(manifest: dict[str, Any]) -> Path | None:
    job = manifest.get("job") or {}
    inp = manifest.get("input") or {}
    if job.get("media_root"):
        return Path(job["media_root"])
    if inp.get("format") == "folder":
        return Path(inp.get("path", "."))
    return Path(inp["path"]).parent if inp.get("path") else None


def _thumb(path: Path) -> str | None:
    """A small JPEG of an image, as a data URL; None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=70)
    except (OSError, ValueError, SyntaxError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _video_thumb(path: Path) -> str | None:
    """A small JPEG of a video's first frame, as a data URL; None without PyAV (the optional
    ``report`` extra) or when the file cannot be decoded."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                img = frame.to_image()
                img.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="JPEG", quality=70)
                return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except (av.error.FFmpegError, OSError, ValueError, IndexError):
        return None
    return None


def _sheet_items(df: Any, root: Path | None) -> list[str]:
    label_col = "extracted" if "extracted" in df.columns else None
    items: list[str] = []
    for _, r in df.iterrows():
        if len(items) >= SHEET_MAX:
            break
        media = r.get("media")
        if media is None or len(media) == 0:
            continue
        first = media[0]
        text = r.get(label_col) if label_col and isinstance(r.get(label_col), str) else r.get("content")
        caption = html.escape(str(text if isinstance(text, str) else r.get("error_message") or ""))[:400]
        if first.get("kind") in ("image", "video") and first.get("source") == "file" and root is not None:
            path = Path(first["path"]) if os.path.isabs(first["path"]) else root / first["path"]
            src = _thumb(path) if first["kind"] == "image" else _video_thumb(path)
            if src:
                picture = f'<img alt="{html.escape(first["path"])}" src="{src}">'
            elif first["kind"] == "video" and path.exists():
                picture = f'<div class="missing">video {html.escape(first.get("mime") or "")} (a frame needs PyAV)</div>'
            else:
                picture = '<div class="missing">file not found</div>'
        else:
            picture = f'<div class="missing">{html.escape(first.get("kind") or "")} {html.escape(first.get("mime") or "")}</div>'
        status = "" if r["status"] == "ok" else f' <span class="bad">{html.escape(str(r["status"]))}</span>'
        score = r.get("score")
        mark = "" if score is None or score != score else (" ✓" if score == 1 else " ✗")
        items.append(f'<div class="item">{picture}<b>{html.escape(str(r["id"]))}</b>{status}{mark}<br>{caption}</div>')
    return items


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>")


def write_html(output: str | Path, dest: str | Path) -> list[Path]:
    """Write the report page (and the contact sheet's further pages); the files written."""
    out, dest = Path(output), Path(dest)
    df = read_results(out)  # once: the report's figures and the page's plots and sheet
    rep = report(out, df)
    manifest = output_manifest(out)
    rows = [("rows", rep["rows"]), ("status", ", ".join(f"{k} {v}" for k, v in sorted(rep["status"].items())))]
    if rep.get("accuracy"):
        a = rep["accuracy"]
        rows.append(("accuracy", f"{a['accuracy']:.3f} (95% CI {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}, n={a['rows']}, every row counted)"))
    t = rep["tokens"]
    rows.append(("tokens", f"prompt {t['prompt']:,} (cached {t['cached']:,}), completion {t['completion']:,}"))
    rows.append(("cost", f"${rep['cost_usd']['total']:.4f} (an estimate at the job's prices)"))
    for key, label in (("latency_s", "latency"), ("ttft_s", "time to first token")):
        p = rep.get(key)
        if p:
            rows.append((label, f"p50 {p['p50']:.2f}s, p90 {p['p90']:.2f}s, p99 {p['p99']:.2f}s"))
    rows.append(("retries, 429s", f"{rep['retries']}, {rep['rate_limited_429s']}"))
    parts = [f"<h1>batchkimi report: {html.escape(str(out))}</h1>",
             "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows) + "</table>"]
    if rep["errors"]:
        parts.append("<h2>Errors by type</h2><table><tr><th>type</th><th>rows</th><th>example</th></tr>" + "".join(
            f"<tr><td>{html.escape(e['error_type'])}</td><td>{e['rows']}</td>"
            f"<td>{html.escape(e['example_id'])}: {html.escape(e['example'][:200])}</td></tr>" for e in rep["errors"]) + "</table>")
    if rep.get("labels"):
        m = rep["labels"]
        kappa = "undefined" if m["kappa"] is None else f"{m['kappa']:.3f}"
        parts.append(f"<h2>Labels</h2><p>macro F1 {m['macro_f1']:.3f}, micro F1 {m['micro_f1']:.3f}, Cohen's kappa {kappa}, "
                     f"no label named in {m['no_label_rate']:.1%} of {m['rows']} rows</p><table><tr><th>label</th>"
                     "<th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>" + "".join(
                         f"<tr><td>{html.escape(k)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                         f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>" for k, v in m["per_label"].items()) + "</table>")
    plots = _plots(df, rep)
    if plots:
        parts.append("<h2>Plots</h2><div class='plots'>" + "".join(
            f"<div class='plot'><h3>{html.escape(name)}</h3>{svg}</div>" for name, svg in plots) + "</div>")
    parts.append(_failures_table(df))
    items = _sheet_items(df, _media_root(manifest))
    written = [dest]
    if items:
        pages = [items[i:i + PER_PAGE] for i in range(0, len(items), PER_PAGE)]
        names = [dest.name] + [f"{dest.stem}-contact-{n}{dest.suffix}" for n in range(2, len(pages) + 1)]

        def nav(k: int) -> str:
            if len(pages) == 1:
                return ""
            links = [f"<a href='{names[i]}'>{i + 1}</a>" if i != k else f"<b>{i + 1}</b>" for i in range(len(pages))]
            return f"<p class='muted'>page {' '.join(links)}</p>"

        with_media = int(df["media"].map(lambda m: m is not None and len(m) > 0).sum()) if "media" in df else len(items)
        more = f" (the first {len(items):,} of {with_media:,})" if with_media > len(items) else ""
        parts.append(f"<h2>Contact sheet ({len(items)} items){more}</h2>{nav(0)}<div class='sheet'>{''.join(pages[0])}</div>")
        for k in range(1, len(pages)):
            path = dest.with_name(names[k])
            path.write_text(_page(f"contact sheet {k + 1}", f"<h1>Contact sheet, page {k + 1}</h1>{nav(k)}"
                                                            f"<div class='sheet'>{''.join(pages[k])}</div>"), encoding="utf-8")
            written.append(path)
    dest.write_text(_page(f"batchkimi report {out}", "".join(parts)), encoding="utf-8")
    return written
