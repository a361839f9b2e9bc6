"""Kill a real ``batchkimi run`` subprocess mid-run; the same command resumes with no row
lost, none written twice, and none that was finished sent again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from .conftest import TEST_KEY, write_jsonl

ROWS = 240
CONCURRENCY = 6


def job_file(tmp_path: Path, base_url: str) -> Path:
    rows = [{"id": f"id-{i}", "text": f"review number {i}, great product"} for i in range(ROWS)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    path = tmp_path / "job.toml"
    path.write_text(
        f'input = "in.jsonl"\noutput = "out"\nbase_url = "{base_url}"\n'
        f'prompt_template = "Label as one of: positive, negative.\\n\\n{{text}}"\n'
        f"concurrency = {CONCURRENCY}\nrows_per_part = 25\nflush_interval_s = 0.5\nmax_tokens = 4096\n"
    )
    return path


def rows_written(out: Path) -> int:
    """Rows durable on disk so far: parts plus journal lines."""
    if not out.exists():
        return 0
    n = sum(len(pd.read_parquet(p, columns=["row"])) for p in out.glob("part-*.parquet"))
    for seg in (out / "_journal").glob("seg-*.jsonl"):
        n += seg.read_bytes().count(b"\n")
    return n


def start(job: Path) -> subprocess.Popen:
    env = {**os.environ, "TOKENHUB_API_KEY": TEST_KEY}
    return subprocess.Popen([sys.executable, "-m", "batchkimi", "run", str(job), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def rerun(job: Path) -> subprocess.CompletedProcess:
    """The same command again, to the end."""
    return subprocess.run([sys.executable, "-m", "batchkimi", "run", str(job), "--quiet"],
                          env={**os.environ, "TOKENHUB_API_KEY": TEST_KEY}, capture_output=True, timeout=120)


def wait_for_rows(proc: subprocess.Popen, out: Path, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while rows_written(out) < at_least:
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def check_complete(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out)
    assert len(df) == ROWS, "one row per input row"
    assert df["id"].is_unique and set(df["row"]) == set(range(ROWS))
    assert (df["status"] == "ok").all()
    return df


def start_and_wait(tmp_path: Path, simulator, rows_done: int):  # noqa: ANN001, ANN201
    """A simulator, the job, a running `batchkimi run`, and at least ``rows_done`` rows on disk."""
    h = simulator(latency_ms=40)
    job = job_file(tmp_path, h.base_url)
    out = tmp_path / "out"
    proc = start(job)
    wait_for_rows(proc, out, rows_done)
    return h, job, out, proc


def test_sigkill_mid_run_then_the_same_command_resumes(tmp_path: Path, simulator) -> None:
    h, job, out, proc = start_and_wait(tmp_path, simulator, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done_at_kill = rows_written(out)
    assert 60 <= done_at_kill < ROWS

    again = rerun(job)
    assert again.returncode == 0, again.stderr.decode()
    assert f"{ROWS} input rows: ok {ROWS}" in again.stdout.decode()
    check_complete(out)
    assert not list((out / "_journal").glob("*.jsonl"))
    # Paid twice at most: the requests that were in flight when the process died.
    answered = h.simulator.stats["by_status"][200]
    assert ROWS <= answered <= ROWS + CONCURRENCY


def test_sigterm_stops_gracefully_with_exit_130_and_resumes(tmp_path: Path, simulator) -> None:
    h, job, out, proc = start_and_wait(tmp_path, simulator, 40)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    assert "run the same command to resume" in err.decode()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["state"] == "interrupted"
    partial = pd.read_parquet(out)
    assert partial["id"].is_unique and len(partial) < ROWS and not list((out / "_journal").glob("*.jsonl"))

    again = rerun(job)
    assert again.returncode == 0, again.stderr.decode()
    check_complete(out)
    assert h.simulator.stats["by_status"][200] == ROWS  # a graceful stop pays for nothing twice


def test_a_second_sigint_skips_the_grace_period(tmp_path: Path, simulator) -> None:
    """First Ctrl-C: finish what is in flight; second: stop now. Stalled requests must not hold it."""
    h = simulator(latency_ms=40, stall_s=600)
    rows = [{"id": f"id-{i}", "text": f"review {i} [[sim:stall]]" if i >= 30 else f"review {i}"} for i in range(ROWS)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out"\nbase_url = "{h.base_url}"\nprompt_template = "{{text}}"\n'
                   "stream = true\nconcurrency = 4\ngrace_s = 300\nidle_timeout_s = 300\nflush_interval_s = 0.2\n")
    proc = start(job)
    wait_for_rows(proc, tmp_path / "out", 30)
    time.sleep(0.5)  # the stalled rows are in flight now
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert time.monotonic() - t0 < 30  # not the 300 s grace
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) >= 30 and df["id"].is_unique
