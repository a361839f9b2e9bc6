"""The same job with its input and output local, or in a bucket on the loopback S3 server.

python storage_client.py BASE_URL INPUT local|s3 [S3_ENDPOINT BUCKET]

Prints rows a second, the process's peak memory and, for s3, what the run put in the bucket.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid

from common import WORK, emit, peak_rss_mb

import batchkimi
import batchkimi.api  # noqa: F401 - the package's names load when first used: load the engine before any clock starts


def main(base_url: str, data: str, side: str, endpoint: str = "", bucket: str = "") -> None:
    cache = WORK / "storage_cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["BATCHKIMI_CACHE_DIR"] = str(cache)
    if side == "s3":
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=endpoint)
        import fsspec

        fs = fsspec.filesystem("s3")
        src = f"{bucket}/data/{os.path.basename(data)}"
        fs.put_file(data, src)
        source, output = f"s3://{src}", f"s3://{bucket}/runs/{uuid.uuid4().hex[:8]}"
    else:
        source, output = data, str(WORK / "out_storage_local")
        shutil.rmtree(output, ignore_errors=True)
    job = batchkimi.Job(input=source, output=output, base_url=base_url, thinking="disabled", stream=False,
                        max_tokens=64, concurrency=64)
    t0 = time.perf_counter()
    summary = batchkimi.run(job)
    wall = time.perf_counter() - t0
    objects = 0
    if side == "s3":
        objects = sum(1 for p in fs.find(output.removeprefix("s3://")) if not p.endswith("/.lock"))
    emit({"side": side, "rows": summary.final_status.get("ok", 0), "wall_s": wall,
          "rows_per_s": summary.final_status.get("ok", 0) / wall, "peak_rss_mb": peak_rss_mb(), "objects": objects})


if __name__ == "__main__":
    main(*sys.argv[1:])
