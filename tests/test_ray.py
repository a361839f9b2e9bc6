"""The Ray engine, on a real single-node Ray cluster started for the session (`ray start --head`):
the same rows as a local run, one rate limit across actors measured at the simulator, and a
SIGKILLed driver that resumes with every row exactly once. Skipped when Ray is not installed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import batchkimi
from batchkimi.errors import ConfigError

from .conftest import TEST_KEY, fast_job, write_jsonl

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

COMPARED = ["id", "row", "status", "content", "reasoning_content", "finish_reason", "prompt_tokens", "completion_tokens",
            "error_type", "error_message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A head node of 4 logical CPUs on this machine; its address for ``ray_address``."""
    port = _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Token auth off on both sides, whatever ~/.ray holds (a local ray.init() elsewhere writes a
    # token there, and a cluster started afterwards would then refuse a driver without it).
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    temp = tempfile.mkdtemp(prefix="bkray-", dir="/tmp" if os.path.isdir("/tmp") else None)  # Ray's socket paths are length-capped
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={temp}"], check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rows(n: int, bad: tuple[int, ...] = ()) -> list[dict]:
    return [{"id": f"q{i}", **({} if i in bad else {"prompt": f"What is {i} + 3? Reply with the number."})} for i in range(n)]


def frame(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values("row").reset_index(drop=True)


def cli_driver(tmp_path: Path, base_url: str, ray_cluster: str, n: int, extra: str = "") -> list[str]:
    """The command line of a Ray run of ``n`` rows, as a user types it (a job file and the CLI)."""
    path = write_jsonl(tmp_path / "in.jsonl", rows(n))
    job_file = tmp_path / "job.toml"
    job_file.write_text(f'input = "{path}"\noutput = "{tmp_path / "out"}"\nbase_url = "{base_url}"\n'
                        'stream = false\nthinking = "disabled"\nmax_tokens = 64\nconcurrency = 8\n' + extra +
                        f'engine = "ray"\nray_address = "{ray_cluster}"\nray_actors = 2\nray_block_rows = 16\n')
    return [sys.executable, "-m", "batchkimi", "run", str(job_file), "--quiet"]


def started_until(cmd: list[str], h, requests: int) -> subprocess.Popen:
    """The driver, once the simulator has seen ``requests`` requests."""
    driver = subprocess.Popen(cmd, env={**os.environ, "TOKENHUB_API_KEY": TEST_KEY}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while h.simulator.stats_json()["requests"] < requests:
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:] if driver.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return driver


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_ray_run_writes_the_same_rows_as_a_local_run(tmp_path: Path, simulator, ray_cluster: str, fmt: str) -> None:
    h = simulator(seed=5)
    data = rows(90, bad=(7, 50))
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "in.jsonl", data)
    else:
        path = tmp_path / "in.parquet"
        pd.DataFrame(data).to_parquet(path, row_group_size=40)
    common = dict(input=str(path), stream=True, thinking="enabled", max_tokens=256, concurrency=8)
    local = batchkimi.run(fast_job(tmp_path, h.base_url, output=str(tmp_path / "local"), **common))
    on_ray = batchkimi.run(fast_job(tmp_path, h.base_url, output=str(tmp_path / "ray"), engine="ray", ray_address=ray_cluster,
                                    ray_actors=2, ray_block_rows=16, **common))
    assert local.final_status == on_ray.final_status == {"ok": 88, "invalid": 2}
    blocks = 6 if fmt == "jsonl" else 7  # a Parquet block never spans row groups: 40 + 40 + 10 rows
    assert on_ray.requests == 88 and any(f"ray: {blocks} blocks" in n and "2 actors" in n for n in on_ray.notes)
    a, b = frame(tmp_path / "local"), frame(tmp_path / "ray")
    pd.testing.assert_frame_equal(a[COMPARED], b[COMPARED])
    assert b["reasoning_content"].str.len().min() > 0  # thinking came back through the actors' streams
    assert set(a.columns) == set(b.columns)
    manifest = json.loads((tmp_path / "ray" / "_manifest.json").read_text())
    assert manifest["state"] == "finished"
    # the layout is a local run's: a local resume finds nothing to do
    again = batchkimi.run(fast_job(tmp_path, h.base_url, output=str(tmp_path / "ray"), **common))
    assert again.requests == 0 and again.final_status == {"ok": 88, "invalid": 2}


def test_a_media_folder_is_captioned_on_ray_as_locally(tmp_path: Path, simulator, ray_cluster: str, monkeypatch) -> None:
    """The sample folder (images and videos), from a relative path: the actors read and encode the
    files, and the rows match a local run's, media records included."""
    from batchkimi.config import load_job

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the job names sample_data/media relative to the project
    h = simulator()
    local = load_job(Path("jobs/caption.toml"), {"output": str(tmp_path / "local"), "base_url": h.base_url})
    on_ray = load_job(Path("jobs/caption.toml"), {"output": str(tmp_path / "ray"), "base_url": h.base_url, "engine": "ray",
                                                  "ray_address": ray_cluster, "ray_actors": 2, "ray_block_rows": 4})
    a, b = batchkimi.run(local), batchkimi.run(on_ray)
    assert a.exit_code == b.exit_code == 0 and a.final_status == b.final_status
    x, y = frame(tmp_path / "local"), frame(tmp_path / "ray")
    pd.testing.assert_frame_equal(x[["id", "status", "content"]], y[["id", "status", "content"]])
    assert [m[0]["sha256"] for m in x["media"]] == [m[0]["sha256"] for m in y["media"]]
    assert h.simulator.stats_json()["videos"] == 2 * sum(m[0]["kind"] == "video" for m in x["media"])


def test_failed_rows_stay_rows_and_an_auth_failure_stops_the_run_resumably(tmp_path: Path, simulator, ray_cluster: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", rows(120))
    on_ray = dict(input=str(path), stream=False, thinking="disabled", max_tokens=64, engine="ray", ray_address=ray_cluster,
                  ray_actors=2, ray_block_rows=10)
    # a key the server refuses: the job stops at once, in a resumable state
    refusing = simulator(api_keys=("sk-somebody-elses-key-0000",))
    stopped = batchkimi.run(fast_job(tmp_path, refusing.base_url, **on_ray))
    assert stopped.exit_code == 1 and stopped.fatal and "401" in stopped.fatal, stopped.fatal
    assert refusing.simulator.stats_json()["requests"] <= 2 * 3 * 10  # the blocks in flight, not the dataset
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["state"] == "failed"
    # the key fixed (a server on the same address that takes it): the same command finishes the job,
    # 500s on a third of the requests (one attempt each) becoming error rows, not a stop
    refusing.stop()
    flaky = simulator(port=refusing.port, fail_rate=0.3, fail_faults=["500"], seed=3)
    summary = batchkimi.run(fast_job(tmp_path, flaky.base_url, max_attempts=1, stop_after_failures=0, **on_ray))
    status = summary.final_status
    assert status.get("error", 0) > 10 and status.get("ok", 0) > 50 and sum(status.values()) == 120, status
    assert summary.exit_code == 3 and summary.fatal is None
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 120 and df["id"].is_unique
    failed = df[df["status"] == "error"]
    assert failed["error_type"].notna().all() and (failed["http_status"] == 500).all()


@pytest.mark.parametrize("limit,value,n", [("rpm", 1200, 300), ("tpm", 30_000, 160)])
def test_the_cluster_limit_holds_across_actors(tmp_path: Path, simulator, ray_cluster: str, limit: str, value: int, n: int) -> None:
    """Three actors, each able to send far faster: the simulator sees the job's RPM, or TPM
    (prompt and completion tokens), within 3%, from its first admission to its last."""
    h = simulator()
    path = write_jsonl(tmp_path / "in.jsonl", rows(n))
    job = fast_job(tmp_path, h.base_url, input=str(path), stream=False, thinking="disabled", max_tokens=64, concurrency=24,
                   engine="ray", ray_address=ray_cluster, ray_actors=3, ray_block_rows=10, **{limit: value})
    summary = batchkimi.run(job)
    s = h.simulator.stats_json()
    assert summary.final_status == {"ok": n} and s["requests"] == n
    window_min = (s["admitted_last_s"] - s["admitted_first_s"]) / 60
    if limit == "rpm":
        rate = (s["admitted"] - 1) / window_min
    else:  # the tokens of every request but the first (admitted at the window's start)
        tokens = s["prompt_tokens"] + s["completion_tokens"]
        rate = (tokens - tokens / s["requests"]) / window_min
    assert abs(rate / value - 1) <= 0.03, rate


def test_server_429s_cost_no_row_across_actors(tmp_path: Path, simulator, ray_cluster: str) -> None:
    """No client-side cap, a server allowing 8 a second: the 429s three actors meet are retried
    to the end and counted once each, at the server and in the summary. (That a 429 one actor
    meets pauses the others is checked without timing in tests/test_ray_limiter.py; how many
    429s that saves depends on the machine's timing, so it is not asserted here.)"""
    h = simulator(rpm=8, window_s=1.0)
    path = write_jsonl(tmp_path / "in.jsonl", rows(60))
    job = fast_job(tmp_path, h.base_url, input=str(path), stream=False, thinking="disabled", max_tokens=64, concurrency=16,
                   max_attempts=20, backoff_base_s=0.5, backoff_max_s=2.0, max_retry_time_s=120,
                   engine="ray", ray_address=ray_cluster, ray_actors=3, ray_block_rows=10)
    summary = batchkimi.run(job)
    stats = h.simulator.stats
    assert summary.final_status == {"ok": 60} and summary.rate_limited > 0
    assert stats["by_status"][429] == summary.rate_limited  # every 429 counted, across the actors
    assert stats["by_status"][200] == 60  # and no answer bought twice


def test_a_lost_limit_actor_leaves_each_worker_its_share_and_the_summary_says_so(tmp_path: Path, simulator,
                                                                                  ray_cluster: str) -> None:
    from batchkimi.events import RowFinished
    from batchkimi.execution.ray_limiter import limit_name

    h = simulator()
    path = write_jsonl(tmp_path / "in.jsonl", rows(200))
    finished = []

    def hook(event: object) -> None:  # runs in the driver, connected to the cluster
        if isinstance(event, RowFinished):
            finished.append(event)
            if len(finished) == 40:
                ray.kill(ray.get_actor(limit_name(h.base_url, TEST_KEY), namespace="batchkimi"), no_restart=True)

    job = fast_job(tmp_path, h.base_url, input=str(path), stream=False, thinking="disabled", max_tokens=64, concurrency=24,
                   rpm=1200, engine="ray", ray_address=ray_cluster, ray_actors=3, ray_block_rows=10)
    summary = batchkimi.run(job, hook=hook)
    s = h.simulator.stats_json()
    assert summary.final_status == {"ok": 200} and s["requests"] == 200
    assert any("could not reach the cluster limit" in n for n in summary.notes)
    rate = (s["admitted"] - 1) / (s["admitted_last_s"] - s["admitted_first_s"]) * 60
    assert rate <= 1200 * 1.03, rate  # three workers, a third of the budget each


def test_a_killed_worker_is_replaced_and_every_row_is_written_once(tmp_path: Path, simulator, ray_cluster: str) -> None:
    """SIGKILL one of the actors mid-run: Ray restarts it and hands its blocks out again; the run
    ends with every row once, having sent again only what that actor had in flight."""
    psutil = pytest.importorskip("psutil")
    from batchkimi.events import RowFinished

    h = simulator(latency_ms=100)
    n = 240
    path = write_jsonl(tmp_path / "in.jsonl", rows(n))
    killed: list[int] = []

    def hook(event: object) -> None:
        if isinstance(event, RowFinished) and not killed and h.simulator.stats_json()["requests"] >= 60:
            workers = [p for p in psutil.process_iter(["cmdline"]) if "BlockWorker" in " ".join(p.info["cmdline"] or [])]
            assert workers, "no BlockWorker process found"
            workers[0].kill()
            killed.append(workers[0].pid)

    job = fast_job(tmp_path, h.base_url, input=str(path), stream=False, thinking="disabled", max_tokens=64, concurrency=8,
                   engine="ray", ray_address=ray_cluster, ray_actors=2, ray_block_rows=8)
    summary = batchkimi.run(job, hook=hook)
    assert killed and summary.final_status == {"ok": n}
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == n and df["id"].is_unique
    resent = h.simulator.stats_json()["requests"] - n
    assert 0 <= resent <= 4 * 8, resent  # that actor's blocks in flight, at most


def test_a_sigkilled_driver_leaves_no_sender_and_resumes_exactly_once(tmp_path: Path, simulator, ray_cluster: str) -> None:
    h = simulator(latency_ms=150)
    n = 400
    cmd = cli_driver(tmp_path, h.base_url, ray_cluster, n)
    driver = started_until(cmd, h, 150)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(30)
    time.sleep(3)  # Ray ends the actors of a dead driver
    sent = h.simulator.stats_json()["requests"]
    time.sleep(2)
    assert h.simulator.stats_json()["requests"] == sent  # nothing outlived the driver and kept sending
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == n and df["id"].is_unique and (df["status"] == "ok").all()
    resent = h.simulator.stats_json()["requests"] - n
    # only blocks in flight at the kill are sent again: at most 2 actors x 4 blocks each x 16 rows
    assert 0 <= resent <= 2 * 4 * 16, resent
    print(f"\nsent again after the SIGKILL: {resent} of {sent} requests sent before it")


def test_ctrl_c_tells_every_actor_to_send_nothing_new_and_the_run_resumes(tmp_path: Path, simulator, ray_cluster: str) -> None:
    h = simulator(latency_ms=300)
    n = 300
    cmd = cli_driver(tmp_path, h.base_url, ray_cluster, n, extra="grace_s = 5\n")
    driver = started_until(cmd, h, 40)
    driver.send_signal(signal.SIGINT)
    time.sleep(1.5)  # the actors ask the run's control actor twice a second
    sent = h.simulator.stats_json()["requests"]
    assert driver.wait(60) == 130
    assert h.simulator.stats_json()["requests"] == sent < n  # nothing new after the stop reached the actors
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["state"] == "interrupted"
    done = len(pd.read_parquet(tmp_path / "out"))
    assert 0 < done <= sent  # what came back in the grace is written
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == n and df["id"].is_unique and (df["status"] == "ok").all()


def test_the_budget_stops_a_ray_run_resumably(tmp_path: Path, simulator, ray_cluster: str) -> None:
    h = simulator(latency_ms=100)
    path = write_jsonl(tmp_path / "in.jsonl", rows(400))
    job = fast_job(tmp_path, h.base_url, input=str(path), stream=False, thinking="disabled", max_tokens=64, concurrency=4,
                   engine="ray", ray_address=ray_cluster, ray_actors=2, ray_block_rows=10, max_cost_usd=0.002)
    summary = batchkimi.run(job)
    assert summary.exit_code == 4 and summary.budget_stop
    written = len(pd.read_parquet(tmp_path / "out"))
    assert 0 < written < 400
    # checked as blocks come back: passed by at most the blocks in flight (2 actors x 2 blocks of
    # 10 rows), those begun before the actors heard of the stop (polled every 0.5 s: 2 blocks at
    # this pace) and those finished but not yet read by the driver (Ray Data's buffer: 2 blocks)
    per_row = summary.cost_usd / written
    assert summary.cost_usd <= 0.002 + (2 * 2 + 2 + 2) * 10 * per_row
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["state"] == "stopped at the budget"


def test_a_ray_run_never_passes_its_budget(tmp_path: Path, simulator, ray_cluster: str) -> None:
    """Every actor asks the run's budget keeper before it sends: what the server billed (its own
    token counts at kimi-k2.6's prices) stays within the budget, cluster-wide."""
    h = simulator(latency_ms=100)
    path = write_jsonl(tmp_path / "in.jsonl", rows(400))
    job = fast_job(tmp_path, h.base_url, input=str(path), stream=False, thinking="disabled", max_tokens=64, concurrency=8,
                   engine="ray", ray_address=ray_cluster, ray_actors=2, ray_block_rows=10, max_cost_usd=0.002)
    summary = batchkimi.run(job)
    s = h.simulator.stats
    billed = ((s["prompt_tokens"] - s["cached_tokens"]) * 0.95 + s["cached_tokens"] * 0.16 + s["completion_tokens"] * 4.0) / 1e6
    assert summary.exit_code == 4 and 0 < billed <= 0.002
    assert summary.cost_usd <= 0.002


def test_without_ray_the_message_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    path = write_jsonl(tmp_path / "in.jsonl", rows(3))
    with pytest.raises(ConfigError, match=r"pip install 'batchkimi\[ray\]'"):
        batchkimi.run(fast_job(tmp_path, "http://127.0.0.1:9/v1", input=str(path), engine="ray"))


def test_the_core_never_imports_ray() -> None:
    code = "import sys, batchkimi, batchkimi.cli, batchkimi.api, batchkimi.execution.run; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
