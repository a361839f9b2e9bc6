"""Scoring a big output: batchkimi's label extraction and scoring over N rows already written
(parts of 10,000 rows made directly with pyarrow), against a minimal loop that reads the same
parts and compares normalised strings.

python scoring_client.py make N          # OUTPUT with N rows (kept between runs)
python scoring_client.py score N         # batchkimi.scoring.score_output over it
python scoring_client.py baseline N      # the minimal loop
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import WORK, cpu_s, emit, peak_rss_mb

LABELS = ("positive", "negative", "neutral")
PER_PART = 10_000


def out_dir(n: int) -> Path:
    return WORK / f"scored_{n}"


def make(n: int) -> None:
    import pyarrow as pa

    from batchkimi.output.parts import part_path, write_table_atomic
    from batchkimi.output.results import result_schema

    out = out_dir(n)
    if out.exists() and len(list(out.glob("part-*.parquet"))) == (n + PER_PART - 1) // PER_PART:
        emit({"rows": n, "made": 0})
        return
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob("*"):
        p.unlink()
    schema = result_schema(("gold",))
    answers = ["positive", "The review is negative.", "I would say: Neutral", "hard to tell"]
    for seq, start in enumerate(range(0, n, PER_PART), 1):
        m = min(PER_PART, n - start)
        rows = {f.name: pa.nulls(m, f.type) for f in schema}
        rows["id"] = pa.array([f"r{i}" for i in range(start, start + m)])
        rows["row"] = pa.array(range(start, start + m), pa.int64())
        rows["status"] = pa.array(["ok"] * m)
        rows["content"] = pa.array([answers[i % 4] for i in range(start, start + m)])
        rows["gold"] = pa.array([LABELS[i % 3] for i in range(start, start + m)])
        rows["finished_at"] = pa.array([1_700_000_000_000 + i for i in range(start, start + m)], pa.int64()).cast(
            pa.timestamp("ms", tz="UTC"))
        write_table_atomic(pa.Table.from_arrays([rows[f.name] for f in schema], schema=schema), part_path(out, seq))
    emit({"rows": n, "made": n})


def score(n: int) -> None:
    from batchkimi.config.specs import specs_of
    from batchkimi.scoring.score import score_output

    specs = specs_of({"labels": list(LABELS)}, {"expected": "gold", "method": "label"})
    c0, t0 = cpu_s(), time.perf_counter()
    counts = score_output(out_dir(n), specs)
    emit({"rows": counts["rows"], "scored": counts["scored"], "wall_s": time.perf_counter() - t0,
          "cpu_s": cpu_s() - c0, "peak_rss_mb": peak_rss_mb()})


def baseline(n: int) -> None:
    import pyarrow.parquet as pq

    c0, t0 = cpu_s(), time.perf_counter()
    right = total = 0
    for p in sorted(out_dir(n).glob("part-*.parquet")):
        t = pq.read_table(p, columns=["content", "gold"])
        for content, gold in zip(t.column("content").to_pylist(), t.column("gold").to_pylist(), strict=True):
            right += content.strip().lower() == gold
            total += 1
    emit({"rows": total, "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0, "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    {"make": make, "score": score, "baseline": baseline}[sys.argv[1]](int(sys.argv[2]))
