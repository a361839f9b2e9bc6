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
from batchkimi.input.reader import detect_format, read_rows, scan_input
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
    (tmp_path / "m.toml").write_text('engine = "spark"\n')
    with pytest.raises(ConfigError, match="engine must be local or ray, got 'spark'"):
        load_job(tmp_path / "m.toml")
    with pytest.raises(ConfigError, match="ray_block_rows must be at least 1"):
        load_job(None, {"engine": "ray", "ray_block_rows": 0})


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


# ---- requests Kimi would refuse, sent anyway (issue 8, items 10, 11) ----


def test_a_tokenhub_service_id_keeps_every_kimi_rule() -> None:
    """On TokenHub's endpoint `ep-...` is a Kimi service: thinking, max_tokens and the checks apply."""
    job = Job(model="ep-7f3a9c", prompt_template="{q}")
    body = build_request({"q": "hi"}, job).body
    assert body["thinking"] == {"type": "enabled"} and body["max_tokens"] == 32768
    with pytest.raises(ConfigError, match="only 1 is allowed"):
        load_job(None, {"model": "ep-7f3a9c", "temperature": 0.3})
    assert not Job(model="ep-7f3a9c", kimi_rules=False).applies_kimi_rules
    assert not Job(model="gpt-4o", base_url="https://api.openai.com/v1").applies_kimi_rules


def test_extra_body_obeys_the_same_rules(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "x.jsonl"\noutput = "o"\n[extra_body]\ntemperature = 0.3\n')
    with pytest.raises(ConfigError, match=r"extra_body.temperature = 0.3 would be refused by Kimi"):
        load_job(job)
    job.write_text('input = "x.jsonl"\noutput = "o"\n[extra_body]\nthinking = {type = "disabled"}\n')
    with pytest.raises(ConfigError, match="extra_body may not set thinking"):
        load_job(job)
    result = invoke("run", str(job), "--dry-run")
    assert result.exit_code == 1 and "extra_body may not set thinking" in result.output


# ---- found by trying it as a new user would (items 16, 20, 26) ----


def unreadable_inputs(tmp_path: Path) -> list[tuple[Path, str]]:
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + b"\x00garbage" * 50 + b"PAR1")
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text('{"prompt": "hi"}\n')
    whole = gzip.compress(("\n".join(json.dumps({"id": i, "prompt": "x" * 80}) for i in range(2000)) + "\n").encode())
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    return [(tmp_path / "nope.jsonl", "does not exist"), (corrupt, "corrupt.parquet"), (not_gzip, "plain.jsonl.gz"),
            (truncated, "cut.jsonl.gz")]


def test_unreadable_inputs_are_one_line_job_errors_naming_the_file(tmp_path: Path) -> None:
    for path, named in unreadable_inputs(tmp_path):
        for extra in ([], ["--dry-run"]):
            result = invoke("run", "--input", str(path), "--output", str(tmp_path / "o"), "--base-url", "simulator",
                            "--quiet", *extra)
            assert result.exit_code == 1, (path, result.output, result.exception)
            assert named in result.output and "Traceback" not in result.output, result.output
            assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_a_job_key_error_exits_1_as_the_readme_says(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "x.jsonl"\noutput = "o"\nconcurency = 4\n')
    result = invoke("run", str(job))
    assert result.exit_code == 1 and "unknown job key 'concurency'" in result.output and "did you mean 'concurrency'" in result.output


def test_dry_run_needs_no_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENHUB_API_KEY")
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    result = CliRunner().invoke(cli, ["run", "--input", str(data), "--output", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0 and "to_send 1" in result.output
    assert "a real run needs an API key" in result.output and "TOKENHUB_API_KEY" in result.output


def test_a_json_array_file_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}], indent=2))
    with pytest.raises(DatasetError, match=r"JSON array, not JSON Lines.*jq -c"):
        scan_input(path, detect_format(path), "id")


def test_a_utf8_bom_and_a_null_line(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "hi"}\nnull\n')
    rows = [r for batch in read_rows(path, "jsonl") for r in batch]
    assert rows[0].data == {"id": "a", "prompt": "hi"}
    assert rows[1].error == "line 2 of bom.jsonl is null, not a JSON object"
    assert scan_input(path, "jsonl", "id").rows == 2


def test_struct_and_list_values_enter_prompts_as_json() -> None:
    job = Job(prompt_template="Item: {item} Tags: {tags} Ok: {ok}")
    body = build_request({"item": {"name": "kettle", "watts": 2000}, "tags": ["a", "b"], "ok": True}, job).body
    assert body["messages"][-1]["content"] == 'Item: {"name":"kettle","watts":2000} Tags: ["a","b"] Ok: true'


def test_keep_columns_naming_a_missing_column_is_an_error(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi", "gold": "x"}])
    result = invoke("run", "--input", str(data), "--output", str(tmp_path / "o"), "--keep-columns", "gold,glod", "--dry-run")
    assert result.exit_code == 1 and "keep_columns names 'glod'" in result.output and "gold" in result.output


def test_simulate_on_a_busy_port_says_so_in_one_line() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = invoke("simulate", "--port", str(s.getsockname()[1]))
    assert result.exit_code == 1 and "Pick another --port" in result.output and "Traceback" not in result.output


def test_every_simulate_flag_and_run_default_is_described() -> None:
    for command in ("simulate", "run"):
        for param in cli.commands[command].params:
            if isinstance(param, __import__("click").Option):
                assert param.help, f"{command} --{param.name} has no description"
    assert "[default: 32]" in invoke("run", "--help").output.replace("(", "").replace(")", "")


def test_readme_and_code_never_point_users_outside_the_project() -> None:
    texts = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("batchkimi/**/*.py"), *ROOT.glob("jobs/*.toml")]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        assert "tokenhub-api.md" not in text and "../shared" not in text, path
    assert (ROOT / "docs" / "kimi-api.md").exists()


def test_the_readme_settings_table_is_the_declared_one() -> None:
    """Every job key is declared once (type and default from Job, flag and help from the table):
    the README shows exactly that table, and every flag `run` takes has a key of its name."""
    from batchkimi.config.settings import SETTINGS, settings_table

    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, "regenerate it: python -m batchkimi.config.settings"
    keyless = {"overwrite", "dry_run", "quiet", "json_summary", "job_file"}
    for param in cli.commands["run"].params:
        if param.name in keyless or not param.opts[0].startswith("--"):
            continue
        assert param.name in SETTINGS and param.opts[0] == "--" + param.name.replace("_", "-"), param.opts


def test_an_object_storage_url_is_never_created_as_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--output s3://bucket/out` once wrote a local folder named `s3:` and said it succeeded. Now
    a URL is the store's (here without credentials: one line saying so), and a path that only
    looks like one is refused."""
    pytest.importorskip("s3fs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENHUB_API_KEY", TEST_KEY)
    monkeypatch.setenv("BATCHKIMI_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask for
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never the internet
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    for args, says in ((["--input", str(data), "--output", "s3://bucket/out"], "no credentials for s3://"),
                       (["--input", "s3://bucket/prompts.parquet", "--output", "out"], "no credentials for s3://"),
                       (["--input", str(data), "--output", "s3:/bucket/out"], "a slash missing")):
        r = CliRunner().invoke(cli, ["run", *args, "--base-url", "simulator"])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "out").exists()  # nothing created
    assert load_job(None, {"input": f"file://{data}", "output": "o"}).input == str(data)
