"""A run under a cost budget on a thinking-length dataset: how much of the budget it used.

python budget_client.py BASE_URL INPUT OUTPUT BUDGET_USD MAX_TOKENS CONCURRENCY
Prints what batchkimi counted; the caller compares it with what the simulator billed.
"""

from __future__ import annotations

import shutil
import sys
import time

from common import emit

import batchkimi
import batchkimi.api  # noqa: F401 - the package's names load when first used: load the engine before any clock starts


def main(base_url: str, data: str, output: str, budget: float, max_tokens: int, concurrency: int) -> None:
    shutil.rmtree(output, ignore_errors=True)
    job = batchkimi.Job(input=data, output=output, base_url=base_url, thinking="enabled", stream=False,
                        max_tokens=max_tokens, concurrency=concurrency, max_cost_usd=budget, event_loop="asyncio")
    t0 = time.perf_counter()
    summary = batchkimi.run(job)
    emit({"requests": summary.requests, "ok": summary.final_status.get("ok", 0), "cost_usd": summary.cost_usd,
          "exit_code": summary.exit_code, "wall_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
