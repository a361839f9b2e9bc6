"""What an output has spent, every run together: the manifest's record (``spend``), plus the
rows of any part written after it (a run killed before it could record its spend wrote them).
A budget (:mod:`batchkimi.policy.budget`) counts from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .parts import part_paths, part_seq


def output_spend(out: Path, recorded: dict[str, Any] | None) -> tuple[float, int, int]:
    """What the output spent before this run, as (usd, tokens, the last part counted): the
    manifest's record, plus the rows of parts written after it (a run killed before it could
    record its spend wrote them)."""
    usd = float((recorded or {}).get("usd", 0.0))
    tokens = int((recorded or {}).get("tokens", 0))
    through = int((recorded or {}).get("through_part", 0))
    last = through
    for path in part_paths(out):
        seq = part_seq(path)
        last = max(last, seq)
        if seq <= through:
            continue
        have = set(pq.read_schema(path).names)
        t = pq.read_table(path, columns=[c for c in ("cost_usd", "prompt_tokens", "completion_tokens") if c in have])
        for name in t.column_names:
            total = pc.sum(t.column(name)).as_py() or 0
            if name == "cost_usd":
                usd += float(total)
            else:
                tokens += int(total)
    return usd, tokens, last
