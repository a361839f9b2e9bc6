"""The CLI (exit codes, dry run, flags over job keys), job files, the reader and the request builder."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchkimi.cli import cli
from batchkimi.config import Job, load_job
from batchkimi.errors import ConfigError, DatasetError
from batchkimi.reader import detect_format, read_rows, scan_input
from batchkimi.request import RowInvalid, build_request, render_template

from .conftest import TEST_KEY, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str, env: dict | None = None):  # noqa: ANN201
    from batchkimi.cli import main  # noqa: F401  (same entry point the script uses)

    return CliRunner().invoke(cli, list(args), env=env, standalone_mode=True)


def test_cli_run_exit_code_0_when_every_row_is_ok(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "prompt": f"What is {i} + 2?"} for i in range(5)])
    result = invoke("run", "--input", str(data), "--output", str(tmp_path / "o"), "--base-url", h.base_url, "--quiet")
    assert result.exit_code == 0, result.output
    assert "5 input rows: ok 5" in result.output


def test_cli_exit_code_3_with_failed_rows_and_2_for_usage(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x [[sim:451]]"}])
    result = invoke("run", "--input", str(data), "--output", str(tmp_path / "o"), "--base-url", h.base_url, "--quiet")
    assert result.exit_code == 3 and "content_filter_error" in result.output
    bad = invoke("run", "--input", str(data), "--output", str(tmp_path / "o2"), "--max-toknes", "5")
    assert bad.exit_code == 2
    bad_value = invoke("run", "--input", str(data), "--output", str(tmp_path / "o3"), "--temperature-typo")
    assert bad_value.exit_code == 2


def test_cli_job_error_exit_code_1_names_the_problem(tmp_path: Path, simulator) -> None:
    h = simulator()
    rows = [{"id": "same", "prompt": "a"}, {"id": "same", "prompt": "b"}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    result = invoke("run", "--input", str(data), "--output", str(tmp_path / "o"), "--base-url", h.base_url, "--quiet")
    assert result.exit_code == 1 and "duplicate" in result.output and "'same'" in result.output


def test_cli_missing_key_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENHUB_API_KEY")
    result = invoke("run", "--input", "nowhere.jsonl", "--output", str(tmp_path / "o"), "--api-key-env", "MY_KIMI_KEY")
    assert result.exit_code == 1 and "export MY_KIMI_KEY=" in result.output


def test_dry_run_checks_rows_shows_first_request_redacted_and_sends_nothing(tmp_path: Path, simulator) -> None:
    h = simulator()
    job = ROOT / "jobs/label_reviews.toml"
    result = invoke("run", str(job), "--base-url", h.base_url, "--output", str(tmp_path / "o"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "invalid 2" in result.output and "to_send 33" in result.output
    assert "line 6 of reviews.jsonl is not valid JSON" in result.output
    assert "Bearer ***" in result.output and TEST_KEY not in result.output
    assert "cost estimate" in result.output
    first = json.loads(result.output[result.output.index("first request:") + len("first request:"):])
    assert first["body"]["thinking"] == {"type": "disabled"} and first["body"]["max_tokens"] == 16
    assert h.simulator.stats["requests"] == 0 and not (tmp_path / "o").exists()


def test_flags_override_job_keys_and_paths_are_relative_to_the_job_file(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs/j.toml").write_text('input = "../data/in.jsonl"\noutput = "../runs/x"\nmodel = "kimi-k2.5"\nconcurrency = 3\n')
    job = load_job(tmp_path / "jobs/j.toml", {"concurrency": 9, "model": None})
    assert job.concurrency == 9 and job.model == "kimi-k2.5"
    assert job.input == str(tmp_path / "data/in.jsonl") and job.output == str(tmp_path / "runs/x")


def test_job_file_errors_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "j.toml").write_text("concurency = 3\n")
    with pytest.raises(ConfigError, match="unknown job key 'concurency'.*did you mean 'concurrency'"):
        load_job(tmp_path / "j.toml")
    (tmp_path / "k.toml").write_text('max_tokens = "lots"\n')
    with pytest.raises(ConfigError, match="'max_tokens' in .*k.toml must be a whole number"):
        load_job(tmp_path / "k.toml")
    (tmp_path / "l.toml").write_text("max_tokens = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(tmp_path / "l.toml")


def test_every_shipped_job_file_loads() -> None:
    for path in (ROOT / "jobs").glob("*.toml"):
        job = load_job(path)
        assert Path(job.input).exists(), path  # type: ignore[arg-type]


def test_reader_formats_gz_and_parquet_folder(tmp_path: Path) -> None:
    rows = [{"id": i, "prompt": f"p{i}"} for i in range(2500)]
    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1000]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1000:]), folder / "b.parquet")
    for path in (tmp_path / "in.jsonl.gz", folder):
        fmt = detect_format(path)
        batches = list(read_rows(path, fmt))
        assert max(len(b) for b in batches) <= 1024  # bounded batches
        assert [r.data["prompt"] for b in batches for r in b] == [r["prompt"] for r in rows]
        tail = [r.pos for b in read_rows(path, fmt, skip_until=2400) for r in b]
        assert tail == list(range(2400, 2500))
        scan = scan_input(path, fmt, "id")
        assert scan.rows == 2500 and scan.has_id_column
    second_file = [r for b in read_rows(folder, "parquet", skip_until=1000) for r in b][0]
    assert (second_file.pos, second_file.where) == (1000, "row 0 of b.parquet")
    assert detect_format(ROOT / "sample_data/openai_batch.jsonl") == "openai_batch"
    with pytest.raises(DatasetError, match="cannot tell the format"):
        detect_format(tmp_path / "x.csv")


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    a = scan_input(write_jsonl(tmp_path / "a.jsonl", [{"p": 1}]), "jsonl", "id")
    b = scan_input(write_jsonl(tmp_path / "b.jsonl", [{"p": 2}]), "jsonl", "id")
    assert a.fingerprint != b.fingerprint and not a.has_id_column


def test_template_rendering() -> None:
    assert render_template('Return {"label": x} for {text}. {{literal}}', {"text": "hi"}) == 'Return {"label": x} for hi. {literal}'
    with pytest.raises(RowInvalid, match="names column 'txt'.*it has: text"):
        render_template("{txt}", {"text": "hi"})
    with pytest.raises(RowInvalid, match="column 'text' is null"):
        render_template("{text}", {"text": None})


def test_request_builder_rules() -> None:
    job = Job(prompt_template="Q: {q}", system="Be brief.")
    body = build_request({"q": "why", "system": None}, job).body
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: why"}]
    assert body["max_tokens"] == 32768 and body["stream"] is True
    row_system = build_request({"q": "why", "system": "Row system"}, job).body
    assert row_system["messages"][0]["content"] == "Row system"
    off = build_request({"prompt": "x"}, Job(thinking="disabled", include_usage=True, stream=True)).body
    assert off["thinking"] == {"type": "disabled"} and "max_tokens" not in off and off["stream_options"] == {"include_usage": True}
    keep = build_request({"prompt": "x"}, Job(thinking_keep="all")).body
    assert keep["thinking"] == {"type": "enabled", "keep": "all"}


def test_messages_rows_are_checked_and_parquet_nulls_dropped() -> None:
    job = Job()
    msgs = [{"role": "user", "content": "hi", "tool_calls": None, "reasoning_content": None}]
    assert build_request({"messages": msgs}, job).body["messages"] == [{"role": "user", "content": "hi"}]
    with pytest.raises(RowInvalid, match=r"messages\[1\] is an assistant tool-call turn without reasoning_content"):
        build_request({"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, job)
    with pytest.raises(RowInvalid, match=r"messages\[0\].role"):
        build_request({"messages": [{"role": "wizard", "content": "x"}]}, job)


def test_batch_lines_with_values_kimi_refuses_are_invalid_rows() -> None:
    line = {"custom_id": "a", "body": {"messages": [{"role": "user", "content": "x"}], "temperature": 0.2}}
    with pytest.raises(RowInvalid, match="body.temperature = 0.2"):
        build_request(line, Job(), batch_line=True)


def test_readme_documents_every_command_and_run_flag() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        assert f"batchkimi {name}" in readme, name
        for param in command.params:
            for opt in param.opts + getattr(param, "secondary_opts", []):
                if opt.startswith("--") and opt not in ("--help",):
                    assert opt in readme, f"{name} {opt}"
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in readme


def test_readme_quick_start_matches_ci() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    test_cmd = re.search(r"```(?:bash|sh)?\n(pip install -e '\.\[test\]'[^\n]*)\n", readme)
    assert test_cmd and test_cmd.group(1) in ci


def test_progress_line_shows_rates_in_flight_retries_and_429s() -> None:
    """The CLI's hook: live requests and tokens per minute against the limits, in flight, retries, 429s."""
    import io

    from batchkimi.events import AttemptFinished, AttemptStarted, RowFinished, RunStarted
    from batchkimi.progress import ProgressBar

    bar = ProgressBar(rpm_limit=600, tpm_limit=100000)
    bar(RunStarted(10, 0, 10))
    bar.bar.fp = io.StringIO()  # type: ignore[union-attr]
    for _ in range(3):
        bar(AttemptStarted(1))
    bar(AttemptFinished(False, 429, "rate_limit_error", 0, retry_in_s=1.0))
    bar(AttemptFinished(True, 200, None, 120))
    bar(RowFinished("ok", 120, 1))
    bar._last_draw = 0
    bar._draw()
    postfix = bar.bar.postfix  # type: ignore[union-attr]
    bar.close()
    assert "ok=1" in postfix and "in-flight=1" in postfix and "retries=1" in postfix and "429s=1" in postfix
    assert "/600" in postfix and "/100k" in postfix


def test_parquet_duplicate_ids_are_refused_and_counts_come_from_footers(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"qid": i % 3000, "q": "x"} for i in range(3001)]), path)
    with pytest.raises(DatasetError, match=r"'0' at row 0 of d.parquet, row 3000 of d.parquet"):
        scan_input(path, "parquet", "qid")
    no_ids = tmp_path / "n.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "x"}] * 2500), no_ids)
    assert scan_input(no_ids, "parquet", "id").rows == 2500


def test_show_lists_counts_first_rows_and_failed_rows(tmp_path: Path, simulator) -> None:
    h = simulator()
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "What is 1 + 1?"}, {"id": "b", "prompt": "x [[sim:451]]"}])
    invoke("run", "--input", str(data), "--output", str(tmp_path / "o"), "--base-url", h.base_url, "--quiet")
    result = invoke("show", str(tmp_path / "o"))
    assert result.exit_code == 0
    assert "2 rows" in result.output and "rows not ok (1)" in result.output and "content_filter_error" in result.output
