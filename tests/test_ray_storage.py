"""Ray without a shared disk: input and output in a bucket (the loopback S3 server of
:mod:`tests.s3_server`), a cluster of two nodes on this machine (Ray's ``cluster_utils``), each
node with the store's credentials in its own environment, as a real cluster's nodes have
theirs. The driver reads no row: each actor reads its block from the store, once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from .conftest import TEST_KEY

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
pytest.importorskip("s3fs")

ROWS, BLOCK = 96, 16


@pytest.fixture()
def two_nodes(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def ray_job(tmp_path: Path, s3: Any, base_url: str, address: str, rows: int) -> list[str]:
    lines = "".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + 3? Reply with the number."}) + "\n"
                    for i in range(rows))
    s3.fs.pipe_file(f"{s3.bucket}/data/questions.jsonl", lines.encode())
    job = tmp_path / "job.toml"
    job.write_text(f'input = "s3://{s3.bucket}/data/questions.jsonl"\noutput = "s3://{s3.bucket}/runs/ray"\n'
                   f'base_url = "{base_url}"\nstream = false\nthinking = "disabled"\nmax_tokens = 64\n'
                   f'concurrency = 8\nengine = "ray"\nray_address = "{address}"\nray_actors = 2\n'
                   f"ray_block_rows = {BLOCK}\nflush_interval_s = 0.5\nrows_per_part = 32\n")
    return [sys.executable, "-m", "batchkimi", "run", str(job), "--quiet"]


def test_a_ray_run_with_its_data_in_a_bucket_reads_each_block_from_the_store_once(
        tmp_path: Path, s3: Any, simulator: Any, two_nodes: Any) -> None:
    h = simulator()
    cmd = ray_job(tmp_path, s3, h.base_url, two_nodes.address, ROWS)
    env = {**os.environ, **s3.env, "TOKENHUB_API_KEY": TEST_KEY}
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    df = pd.read_parquet(f"s3://{s3.bucket}/runs/ray")
    assert len(df) == ROWS and df["id"].is_unique and (df["status"] == "ok").all()
    assert h.simulator.stats_json()["requests"] == ROWS
    # the driver fetched the object once (to count and fingerprint it); each block was one ranged GET
    assert s3.count("GET", "/data/questions.jsonl") == 1 + ROWS // BLOCK


def test_a_sigkilled_ray_driver_on_a_bucket_resumes_with_every_row_once(
        tmp_path: Path, s3: Any, simulator: Any, two_nodes: Any) -> None:
    h = simulator(latency_ms=60)
    rows = 320
    cmd = ray_job(tmp_path, s3, h.base_url, two_nodes.address, rows)
    env = {**os.environ, **s3.env, "TOKENHUB_API_KEY": TEST_KEY}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:  # until some rows are in parts in the bucket
        s3.fs.invalidate_cache()
        if any(p.rsplit("/", 1)[-1].startswith("part-") for p in s3.fs.find(f"{s3.bucket}/runs/ray")):
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(3)  # Ray ends the actors of a dead driver
    assert h.simulator.stats_json()["requests"] < rows
    again = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    df = pd.read_parquet(f"s3://{s3.bucket}/runs/ray")
    assert len(df) == rows and df["id"].is_unique and set(df["row"]) == set(range(rows))
    assert (df["status"] == "ok").all()
    # paid twice at most: the blocks in flight when the driver died (a block is Ray's unit of commit):
    # 2 actors x 4 blocks each x 16 rows, as on a local disk
    assert h.simulator.stats_json()["requests"] - rows <= 2 * 4 * BLOCK
