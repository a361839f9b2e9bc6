"""A streamed job through the Ray engine (a one-machine cluster started here) or the local one.

python ray_client.py BASE_URL INPUT OUTPUT CONCURRENCY ACTORS   (ACTORS 0: the local engine)
Prints the run's wall time and, for Ray, the cluster limit actor's leases, permits and CPU.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from common import emit

import batchkimi
import batchkimi.api  # noqa: F401 - the package's names load when first used: load the engine before any clock starts


def main(base_url: str, data: str, output: str, concurrency: int, actors: int) -> None:
    shutil.rmtree(output, ignore_errors=True)
    extra = {}
    if actors:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray by a benchmark
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace="batchkimi")
        extra = {"engine": "ray", "ray_actors": actors, "ray_block_rows": 64}
        start_s = time.perf_counter() - t0
    job = batchkimi.Job(input=data, output=output, base_url=base_url, thinking="enabled", stream=True, max_tokens=4096,
                        concurrency=concurrency, **extra)
    if actors:  # made before the run, so that its start-up is not counted in its cost per permit
        from batchkimi.execution.ray_limiter import limit_actor

        before = ray.get(limit_actor(base_url, os.environ["TOKENHUB_API_KEY"], 0, 0, concurrency).stats.remote())
    t0 = time.perf_counter()
    summary = batchkimi.run(job)
    wall = time.perf_counter() - t0
    result = {"ok": summary.final_status.get("ok", 0), "wall_s": wall}
    if actors:
        from batchkimi.execution.ray_limiter import limit_name

        stats = ray.get(ray.get_actor(limit_name(base_url, os.environ["TOKENHUB_API_KEY"]), namespace="batchkimi").stats.remote())
        result.update(start_s=start_s, leases=stats["leases"], permits=stats["units"], limit_cpu_s=stats["busy_s"],
                      limit_process_cpu_s=stats["process_cpu_s"] - before["process_cpu_s"])
        ray.shutdown()
    emit(result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
