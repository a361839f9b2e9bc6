"""Labelling metrics of a ``label`` job with a gold column: the confusion matrix, per-label
precision, recall, F1 and support, macro and micro F1, Cohen's kappa against gold, the
distribution of the labels given, and how often an answer named no label. Pure.

Every row with a gold value counts: a row that got no answer, or whose answer named no label (or
was ambiguous), is predicted ``(none)``. Precision of a label never predicted is 0, as are F1
scores over zero (scikit-learn's ``zero_division=0``); macro F1 averages over the job's labels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

NONE = "(none)"


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def label_metrics(gold: Sequence[str | None], predicted: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any] | None:
    """The metrics over the rows whose gold value is known (None where there is none)."""
    pairs = [(g, p if isinstance(p, str) and p else NONE) for g, p in zip(gold, predicted, strict=True)
             if isinstance(g, str) and g != ""]
    if not pairs:
        return None
    n = len(pairs)
    classes = list(dict.fromkeys([*labels, *sorted({g for g, _ in pairs} - set(labels))]))
    columns = [*classes, *sorted({p for _, p in pairs} - set(classes) - {NONE}), NONE]
    counts = Counter(pairs)
    matrix = {g: {p: counts.get((g, p), 0) for p in columns} for g in classes}
    per_label = {}
    tp_all = fp_all = fn_all = 0
    for c in labels:
        tp = counts.get((c, c), 0)
        predicted_c = sum(v for (_, p), v in counts.items() if p == c)
        support = sum(v for (g, _), v in counts.items() if g == c)
        fp, fn = predicted_c - tp, support - tp
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / support if support else 0.0
        per_label[c] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(_f1(precision, recall), 4),
                        "support": support, "predicted": predicted_c}
    micro_p = tp_all / (tp_all + fp_all) if tp_all + fp_all else 0.0
    micro_r = tp_all / (tp_all + fn_all) if tp_all + fn_all else 0.0
    # Cohen's kappa: observed agreement against the agreement expected from the two marginals
    gold_m = Counter(g for g, _ in pairs)
    pred_m = Counter(p for _, p in pairs)
    po = sum(1 for g, p in pairs if g == p) / n
    pe = sum(gold_m[c] * pred_m.get(c, 0) for c in gold_m) / (n * n)
    kappa = (po - pe) / (1 - pe) if pe < 1 else None  # one class on both sides: kappa is undefined
    return {
        "rows": n,
        "labels": list(labels),
        "confusion_matrix": {"gold": classes, "predicted": columns, "counts": [[matrix[g][p] for p in columns] for g in classes]},
        "per_label": per_label,
        "macro_f1": round(sum(v["f1"] for v in per_label.values()) / len(per_label), 4) if per_label else None,
        "micro_f1": round(_f1(micro_p, micro_r), 4),
        "kappa": None if kappa is None else round(kappa, 4),
        "distribution": {p: pred_m.get(p, 0) for p in columns},
        "no_label_rate": round(pred_m.get(NONE, 0) / n, 4),
    }


def label_lines(m: dict[str, Any]) -> list[str]:
    """The metrics as text lines for ``report``."""
    kappa = "undefined (one class only)" if m["kappa"] is None else f"{m['kappa']:.3f}"
    lines = [f"labels over {m['rows']} rows with a gold value: macro F1 {m['macro_f1']:.3f}, micro F1 {m['micro_f1']:.3f}, "
             f"Cohen's kappa {kappa}, no label named in {m['no_label_rate']:.1%}"]
    width = max(len(c) for c in [*m["confusion_matrix"]["predicted"], "gold \\ answer"])
    cols = m["confusion_matrix"]["predicted"]
    lines.append("  " + "gold \\ answer".ljust(width) + "".join(c.rjust(width + 2) for c in cols))
    for g, row in zip(m["confusion_matrix"]["gold"], m["confusion_matrix"]["counts"], strict=True):
        lines.append("  " + g.ljust(width) + "".join(str(v).rjust(width + 2) for v in row))
    for label, v in m["per_label"].items():
        lines.append(f"  {label}: precision {v['precision']:.3f}, recall {v['recall']:.3f}, F1 {v['f1']:.3f}, support {v['support']}")
    return lines
