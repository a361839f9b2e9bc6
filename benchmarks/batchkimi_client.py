"""batchkimi's full run (read, limit, send, parse, write Parquet, checkpoint), timed in-process.

python batchkimi_client.py BASE_URL INPUT OUTPUT CONCURRENCY stream|plain
Environment: BENCH_LOOP=uvloop|asyncio (the job's event_loop); BENCH_CA_FILE (the job's ca_file).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from common import cpu_s, emit

import batchkimi
import batchkimi.api  # noqa: F401 - the package's names load when first used: load the engine before any clock starts


def main(base_url: str, data: str, output: str, concurrency: int, stream: bool) -> None:
    shutil.rmtree(output, ignore_errors=True)
    job = batchkimi.Job(input=data, output=output, base_url=base_url, thinking="disabled", stream=stream,
                        max_tokens=64, concurrency=concurrency, event_loop=os.environ.get("BENCH_LOOP", "asyncio"),
                        ca_file=os.environ.get("BENCH_CA_FILE"))
    c0, t0 = cpu_s(), time.perf_counter()
    summary = batchkimi.run(job)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    emit({"requests": summary.requests, "ok": summary.final_status.get("ok", 0), "rows": summary.total_rows,
          "wall_s": wall, "cpu_s": cpu})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "stream")
