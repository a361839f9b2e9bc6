"""A streamed job through the Ray engine (a one-machine cluster started here) or the local one.

python ray_client.py BASE_URL INPUT OUTPUT CONCURRENCY ACTORS [S3_ENDPOINT BUCKET]   (ACTORS 0: the local engine)
Prints the run's wall time and, for Ray, the cluster limit actor's leases, permits and CPU.
With S3_ENDPOINT and BUCKET the input is uploaded there and read and written as s3:// URLs (the
actors read their blocks from the store); the driver's peak memory is printed too.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from common import WORK, emit, peak_rss_mb

import batchkimi
import batchkimi.api  # noqa: F401 - the package's names load when first used: load the engine before any clock starts


def main(base_url: str, data: str, output: str, concurrency: int, actors: int, endpoint: str = "", bucket: str = "") -> None:
    shutil.rmtree(output, ignore_errors=True)
    if endpoint:  # before Ray starts: its workers inherit the store's credentials, as a node would have its own
        import uuid

        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=endpoint, BATCHKIMI_CACHE_DIR=str(WORK / "ray_storage_cache"))
        shutil.rmtree(WORK / "ray_storage_cache", ignore_errors=True)
        import fsspec

        fsspec.filesystem("s3").put_file(data, f"{bucket}/data/{os.path.basename(data)}")
        data = f"s3://{bucket}/data/{os.path.basename(data)}"
        output = f"s3://{bucket}/runs/{uuid.uuid4().hex[:8]}"
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
    result = {"ok": summary.final_status.get("ok", 0), "wall_s": wall, "driver_peak_rss_mb": peak_rss_mb()}
    if actors:
        from batchkimi.execution.ray_limiter import limit_name

        stats = ray.get(ray.get_actor(limit_name(base_url, os.environ["TOKENHUB_API_KEY"]), namespace="batchkimi").stats.remote())
        result.update(start_s=start_s, leases=stats["leases"], permits=stats["units"], limit_cpu_s=stats["busy_s"],
                      limit_process_cpu_s=stats["process_cpu_s"] - before["process_cpu_s"])
        ray.shutdown()
    emit(result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:8])
