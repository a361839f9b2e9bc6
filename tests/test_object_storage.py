"""Datasets, media folders and outputs on object storage: a real S3-protocol server on
loopback (:mod:`tests.s3_server`), reached as real S3 is (``AWS_ENDPOINT_URL``), counting the
GETs and PUTs it serves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

import batchkimi
from batchkimi.cli import cli
from batchkimi.config import load_job
from batchkimi.errors import ConfigError, OutputError
from batchkimi.output.sink import read_results

from .conftest import TEST_KEY

pytest.importorskip("s3fs")
pytest.importorskip("moto")

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "sample_data" / "media" / "images"
ROWS = 240
CONCURRENCY = 6


def put_rows(s3: Any, key: str, n: int) -> str:
    data = "".join(json.dumps({"id": f"id-{i}", "text": f"review number {i}, great product"}) + "\n" for i in range(n))
    s3.fs.pipe_file(f"{s3.bucket}/{key}", data.encode())
    return f"s3://{s3.bucket}/{key}"


def job_file(tmp_path: Path, s3: Any, base_url: str, rows: int = ROWS, out: str = "runs/labels") -> Path:
    source = put_rows(s3, "data/reviews.jsonl", rows)
    path = tmp_path / "job.toml"
    path.write_text(
        f'input = "{source}"\noutput = "s3://{s3.bucket}/{out}"\nbase_url = "{base_url}"\n'
        f'prompt_template = "Label as one of: positive, negative.\\n\\n{{text}}"\n'
        f"concurrency = {CONCURRENCY}\nrows_per_part = 25\nflush_interval_s = 0.5\nmax_tokens = 4096\n"
    )
    return path


def remote_rows(s3: Any, out: str) -> int:
    """Rows in the parts on the store (what a reader on another machine sees)."""
    s3.fs.invalidate_cache()
    paths = [p for p in s3.fs.find(f"{s3.bucket}/{out}") if p.rsplit("/", 1)[-1].startswith("part-")]
    return sum(len(pd.read_parquet(f"s3://{p}", columns=["row"])) for p in paths)


def test_a_labelling_job_on_a_bucket_runs_is_read_back_and_a_rerun_fetches_nothing_unchanged(
        tmp_path: Path, s3: Any, simulator: Any) -> None:
    h = simulator()
    job = load_job(job_file(tmp_path, s3, h.base_url, rows=60))
    summary = batchkimi.run(job)
    assert summary.exit_code == 0 and summary.output == job.output
    url = job.output
    df = read_results(url)
    assert len(df) == 60 and df["id"].is_unique and set(df["status"]) == {"ok"}
    # pandas reads the URL itself: the parts are whole objects at the top of the folder
    direct = pd.read_parquet(url)
    assert sorted(direct["id"]) == sorted(df["id"])
    names = {p.rsplit("/", 1)[-1] for p in s3.fs.find(f"{s3.bucket}/runs/labels")}
    assert "_manifest.json" in names and not any(n.startswith(("seg-", ".lock")) for n in names), names
    # every object written once, as a whole: one PUT per part, the manifest a few times (start, end)
    assert s3.count("PUT", ".parquet") == sum(1 for n in names if n.endswith(".parquet"))

    dry = batchkimi.dry_run(job)  # reads a copy of the bucket's output, writes nothing there
    assert dry.already_done == 60 and dry.total_rows == 60 and not dry.status.get("to_send")
    s3.reset()
    again = batchkimi.run(job)
    assert again.exit_code == 0 and h.simulator.stats_json()["requests"] == 60  # nothing sent again
    assert s3.count("GET", "reviews.jsonl") == 0  # the input is unchanged: its local copy serves
    assert s3.count("GET", ".parquet") == 0  # so are the parts
    assert s3.count("PUT", ".parquet") == 0

    r = CliRunner().invoke(cli, ["show", url])
    assert r.exit_code == 0 and "60 rows" in r.stdout, r.output
    r = CliRunner().invoke(cli, ["report", url, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == 60, r.output
    r = CliRunner().invoke(cli, ["export", url, "--format", "jsonl"])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 60
    assert "testing" not in r.output  # no credential anywhere


def test_sigkill_mid_run_on_a_bucket_then_the_same_command_resumes(tmp_path: Path, s3: Any, simulator: Any) -> None:
    h = simulator(latency_ms=40)
    job = job_file(tmp_path, s3, h.base_url)
    env = {**os.environ, **s3.env, "TOKENHUB_API_KEY": TEST_KEY}
    cmd = [sys.executable, "-m", "batchkimi", "run", str(job), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while remote_rows(s3, "runs/labels") < 50:
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert s3.fs.exists(f"{s3.bucket}/runs/labels/.lock")  # a killed run cannot say it is gone

    again = subprocess.run(cmd, env=env, capture_output=True, timeout=180)
    assert again.returncode == 0, again.stderr.decode()
    assert f"{ROWS} input rows: ok {ROWS}" in again.stdout.decode()
    df = pd.read_parquet(f"s3://{s3.bucket}/runs/labels")
    assert len(df) == ROWS and df["id"].is_unique and set(df["row"]) == set(range(ROWS))
    assert (df["status"] == "ok").all()
    # paid twice at most: the requests in flight when the process died (the journal was on this machine)
    answered = h.simulator.stats["by_status"][200]
    assert ROWS <= answered <= ROWS + CONCURRENCY
    s3.fs.invalidate_cache()
    assert not s3.fs.exists(f"{s3.bucket}/runs/labels/.lock")  # the run that finished let it go


def test_a_second_run_on_a_bucket_output_is_refused_and_a_dead_runs_lock_is_taken_over(
        tmp_path: Path, s3: Any, simulator: Any) -> None:
    h = simulator()
    job = load_job(job_file(tmp_path, s3, h.base_url, rows=10))
    lock = f"{s3.bucket}/runs/labels/.lock"
    alive = {"owner": "x", "host": "another-host", "pid": 1, "beat": time.time()}
    s3.fs.pipe_file(lock, json.dumps(alive).encode())
    with pytest.raises(OutputError, match="being written by another batchkimi run .another-host pid 1"):
        batchkimi.run(job)
    assert h.simulator.stats_json()["requests"] == 0
    # the same lock without a heartbeat for longer than the stale window: its run is gone
    s3.fs.pipe_file(lock, json.dumps({**alive, "beat": time.time() - 3600}).encode())
    assert batchkimi.run(job).exit_code == 0
    # a run killed on this very host: its pid is dead, no need to wait out the window
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    s3.fs.pipe_file(lock, json.dumps({**alive, "host": socket.gethostname(), "pid": int(dead.stdout)}).encode())
    assert batchkimi.run(job).exit_code == 0


def test_a_bucket_prefix_that_is_no_batchkimi_output_is_never_written_or_emptied(
        tmp_path: Path, s3: Any, simulator: Any) -> None:
    h = simulator()
    s3.fs.pipe_file(f"{s3.bucket}/datasets/precious.csv", b"a,b\n1,2\n")
    job = load_job(job_file(tmp_path, s3, h.base_url, rows=5, out="datasets"))
    with pytest.raises(OutputError, match="not a batchkimi output"):
        batchkimi.run(job, overwrite=True)
    assert s3.fs.cat_file(f"{s3.bucket}/datasets/precious.csv") == b"a,b\n1,2\n"


def test_captioning_a_folder_in_a_bucket_fetches_only_new_objects_on_a_rerun(
        tmp_path: Path, s3: Any, simulator: Any) -> None:
    h = simulator()
    for name in ("circle.png", "square.jpg"):
        s3.fs.put_file(str(IMAGES / name), f"{s3.bucket}/photos/{name}")
    s3.fs.put_file(str(IMAGES / "triangle.webp"), f"{s3.bucket}/photos/sub/triangle.webp")
    args = ["caption", f"s3://{s3.bucket}/photos", "--output", f"s3://{s3.bucket}/captions", "--prompt",
            "Describe this image.", "--base-url", h.base_url, "--quiet", "--no-thinking", "--max-tokens", "256"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    df = read_results(f"s3://{s3.bucket}/captions")
    assert sorted(df["id"]) == ["circle.png", "square.jpg", "sub/triangle.webp"] and set(df["status"]) == {"ok"}
    assert h.simulator.stats_json()["images"] == 3

    s3.fs.put_file(str(IMAGES / "blink.gif"), f"{s3.bucket}/photos/blink.gif")
    s3.reset()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "1 new, 0 changed" in r.output, r.output
    assert h.simulator.stats_json()["requests"] == 4  # only the new object was sent
    assert s3.count("GET", "/photos/blink.gif") == 1
    assert sum(s3.count("GET", f"/photos/{n}") for n in ("circle.png", "square.jpg", "sub/triangle.webp")) == 0


@pytest.mark.parametrize("url,says", [
    ("foo://bucket/data.jsonl", "foo:// is no storage batchkimi knows"),
    ("s3:/bucket/data.jsonl", "with a slash missing"),
])
def test_a_url_batchkimi_cannot_reach_is_one_line_naming_what_to_do(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_job(None, {"input": url, "output": "out"})


@pytest.mark.parametrize("scheme,library,extra", [("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure")])
def test_a_store_whose_library_is_missing_names_the_extra_to_install(scheme: str, library: str, extra: str) -> None:
    try:
        __import__(library)
    except ImportError:
        pass
    else:
        pytest.skip(f"{library} is installed here")
    with pytest.raises(ConfigError, match=rf"pip install 'batchkimi\[{extra}\]'"):
        load_job(None, {"input": f"{scheme}://bucket/data.jsonl", "output": "out"})


def test_credentials_written_into_a_url_never_appear_in_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_job(None, {"input": "foo://AKIDSECRET:hunter2@bucket/x.jsonl", "output": "out"})
    assert "hunter2" not in str(info.value) and "AKIDSECRET" not in str(info.value)


def test_an_object_whose_key_climbs_out_of_the_folder_is_never_fetched(tmp_path: Path, s3: Any, simulator: Any) -> None:
    """A key is any string: ``photos/../../x`` must not write outside the local copy, nor be sent."""
    h = simulator()
    s3.fs.put_file(str(IMAGES / "circle.png"), f"{s3.bucket}/photos/circle.png")
    s3.fs.pipe_file(f"{s3.bucket}/photos/../../escaped.png", (IMAGES / "square.jpg").read_bytes())
    r = CliRunner().invoke(cli, ["caption", f"s3://{s3.bucket}/photos", "--output", str(tmp_path / "out"), "--prompt",
                                 "Describe this image.", "--base-url", h.base_url, "--quiet", "--no-thinking"])
    assert r.exit_code == 0, r.output
    assert sorted(read_results(tmp_path / "out")["id"]) == ["circle.png"]
    assert not list((tmp_path / "cache").rglob("escaped.png"))


def test_the_demo_runs_from_a_bucket_into_a_bucket_and_scores_there(tmp_path: Path, s3: Any) -> None:
    """The shipped demo (its failures on purpose, its scoring) with its dataset and output in a bucket."""
    s3.fs.put_file(str(ROOT / "sample_data" / "reviews.jsonl"), f"{s3.bucket}/data/reviews.jsonl")
    url = f"s3://{s3.bucket}/runs/demo"
    job = load_job(ROOT / "jobs" / "demo.toml", {"input": f"s3://{s3.bucket}/data/reviews.jsonl", "output": url})
    summary = batchkimi.run(job, api_key=TEST_KEY)
    assert summary.exit_code == 3 and summary.output == url  # the demo's rows that fail on purpose
    local = batchkimi.run(load_job(ROOT / "jobs" / "demo.toml", {"output": str(tmp_path / "demo")}), api_key=TEST_KEY)
    assert summary.final_status == local.final_status
    s3.fs.invalidate_cache()
    assert s3.fs.exists(f"{s3.bucket}/runs/demo/_scores.parquet")  # scored after the run, then pushed
    remote, here = read_results(url), read_results(tmp_path / "demo")
    assert list(remote["status"]) == list(here["status"])
    assert remote["score"].fillna(-1).tolist() == here["score"].fillna(-1).tolist()  # unscored rows alike too


def test_a_nightly_folder_in_a_bucket_is_compared_and_trended(tmp_path: Path, s3: Any, simulator: Any) -> None:
    """`compare --latest` and `trend` on a bucket's folder of nightly runs, named by their night."""
    h = simulator()
    source = put_rows(s3, "data/reviews.jsonl", 20)
    for night in ("2026-12-05", "2026-12-04", "2026-12-06"):  # written out of order: the names sort them
        job = load_job(None, {"input": source, "output": f"s3://{s3.bucket}/runs/nightly/{night}", "base_url": h.base_url,
                              "prompt_template": "Label: {text}"})
        assert batchkimi.run(job, api_key=TEST_KEY).exit_code == 0
    folder = f"s3://{s3.bucket}/runs/nightly"
    r = CliRunner().invoke(cli, ["trend", folder, "--json"])
    assert r.exit_code == 0, r.output
    assert [run["run"] for run in json.loads(r.stdout)["runs"]] == ["2026-12-04", "2026-12-05", "2026-12-06"]
    r = CliRunner().invoke(cli, ["compare", "--latest", folder, "--json"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)
    assert "2026-12-05" in json.dumps(c["before"]) and "2026-12-06" in json.dumps(c["after"])


def test_an_output_deleted_from_its_bucket_starts_afresh_not_from_this_machines_old_journal(
        tmp_path: Path, s3: Any, simulator: Any) -> None:
    """The local copy keeps a killed run's journal; if the output is then deleted from the bucket
    (a fresh start), that journal's rows must not come back into the new output."""
    h = simulator()
    job = load_job(job_file(tmp_path, s3, h.base_url, rows=10))
    assert batchkimi.run(job).exit_code == 0
    copy = next((tmp_path / "cache" / "output").iterdir())
    journal = copy / "_journal"
    journal.mkdir(exist_ok=True)
    (journal / "seg-000099.jsonl").write_text(json.dumps({"id": "ghost", "row": 5, "status": "ok"}) + "\n")
    s3.fs.rm(f"{s3.bucket}/runs/labels", recursive=True)
    assert batchkimi.run(job).exit_code == 0
    df = read_results(job.output)
    assert sorted(df["id"]) == sorted(f"id-{i}" for i in range(10)) and h.simulator.stats_json()["requests"] == 20


def test_a_storage_table_reaches_the_store_and_no_secret_of_it_is_written(
        tmp_path: Path, s3: Any, simulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`[storage]` options go to the store's filesystem (here the endpoint, with the environment's
    taken away); the manifest records them with any secret's value hidden."""
    h = simulator()
    path = job_file(tmp_path, s3, h.base_url, rows=5)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    path.write_text(path.read_text() + f'[storage]\nendpoint_url = "{s3.url}"\nsecret = "testing"\nkey = "testing"\n')
    job = load_job(path)
    assert batchkimi.run(job).exit_code == 0
    data = s3.fs.cat_file(f"{s3.bucket}/runs/labels/_manifest.json")
    manifest = json.loads(data)
    assert manifest["job"]["storage"] == {"endpoint_url": s3.url, "secret": "***", "key": "***"}
    assert b"testing" not in data


def test_the_manifest_records_a_url_and_storage_options_without_their_secrets() -> None:
    """What a run writes of its job (the manifest's `job`) is what public_dict gives."""
    job = batchkimi.Job(input="s3://AKID:hunter2@bucket/x.jsonl?X-Amz-Signature=abc", output="s3://bucket/out",
                        storage={"client_kwargs": {"aws_secret_access_key": "hunter2"}, "anon": False})
    public = json.dumps(job.public_dict())
    assert "hunter2" not in public and "X-Amz-Signature" not in public and "AKID" not in public
    assert job.public_dict()["storage"] == {"client_kwargs": {"aws_secret_access_key": "***"}, "anon": False}


def test_one_bucket_folder_spelled_with_or_without_its_slash_has_one_local_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed run's journal lives in the local copy: the same output spelled `s3://b/out/` on
    the rerun must find it."""
    from batchkimi.storage.remote import copy_dir

    monkeypatch.setenv("BATCHKIMI_CACHE_DIR", str(tmp_path))
    assert copy_dir("s3://bucket/runs/out/", "output") == copy_dir("s3://bucket/runs/out", "output")
    assert copy_dir("s3://bucket/runs/out", "output") != copy_dir("s3://bucket/runs/out2", "output")
