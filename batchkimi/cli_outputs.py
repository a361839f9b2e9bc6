"""The CLI's commands that read an output a run wrote: ``show``, ``score``, ``report``,
``compare``, ``export`` (added to the group by :mod:`batchkimi.cli`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .cli_common import EXIT_REGRESSION
from .cli_common import Fail as _Fail
from .config import Job, load_job, resolve_api_key
from .errors import JobError


class _Output(click.ParamType):
    """A run's output: a local folder that exists, or the URL of one on object storage."""

    name = "output"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from .storage.location import is_url

        if isinstance(value, str) and is_url(value):
            return value
        return click.Path(file_okay=False, exists=True, path_type=Path).convert(value, param, ctx)


OUTPUT = _Output()


def _output(output: Path | str) -> Path:
    """OUTPUT, checked to be a batchkimi output (one line saying why not)."""
    from .output.sink import check_output

    try:
        return check_output(output)
    except JobError as exc:
        raise _Fail(str(exc)) from None


def _unfinished(output: Path) -> str:
    """A note for an output whose run did not finish (killed, still running, stopped)."""
    from .report.report import run_state

    state = run_state(output)
    return "" if state in ("finished", None) else f" (the run did not finish: {state})"


def _print(data: dict[str, Any], lines_of: Any, as_json: bool) -> None:
    """``data`` as indented JSON, or as the text lines ``lines_of`` makes of it."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        for line in lines_of(data):
            click.echo(line)


def _destination(path: Path) -> Path:
    """A file to write: its folder made if missing, or one line saying why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Fail(f"cannot make the folder {path.parent} for {path.name}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise _Fail(f"{path} is a folder: give a file name")
    return path


@click.command()
@click.argument("output", type=OUTPUT)
@click.option("--head", type=int, default=5, show_default=True, help="Rows to show.")
def show(output: Path | str, head: int) -> None:
    """Counts by status, the first rows and the failed rows of a run's OUTPUT directory."""
    from .output.sink import read_results

    output = _output(output)
    df = read_results(output)
    click.echo(f"{len(df)} rows" + _unfinished(output))
    if len(df):
        click.echo(df["status"].value_counts().to_string())
        def short(frame: Any) -> Any:
            out = frame.copy()
            for col in out.columns:
                if out[col].dtype == object or str(out[col].dtype).startswith("str"):
                    text = out[col].fillna("").astype(str).str.replace("\n", " ")
                    out[col] = text.where(text.str.len() <= 60, text.str.slice(0, 57) + "...")
            return out

        click.echo("\nfirst rows:")
        click.echo(short(df[["id", "status", "content", "reasoning_content", "total_tokens"]].head(head)).to_string(index=False))
        failed = df[df["status"] != "ok"]
        if len(failed):
            click.echo(f"\nrows not ok ({len(failed)}):")
            click.echo(short(failed[["id", "row", "status", "error_type", "error_message"]].head(head)).to_string(index=False))


def _job_for(output: Path, job_file: Path | None) -> Job:
    """The job whose [extract] and [score] apply: a job file's, or the run's own (its manifest)."""
    from .output.sink import Sink

    if job_file is not None:
        return load_job(job_file)
    saved = (Sink(output).read_manifest() or {}).get("job")
    if not saved:
        raise _Fail(f"{output} holds no batchkimi manifest: pass --job with the [extract] and [score] to use")
    return load_job(None, saved)


@click.command()
@click.argument("output", type=OUTPUT)
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Take [extract] and [score] from this job file instead of the run's own.")
def score(output: Path | str, job_file: Path | None) -> None:
    """Extract and score OUTPUT's answers again (after changing a scorer). Nothing is sent,
    except, for a model-graded score, the grading requests of answers not graded yet."""
    import asyncio

    from .api import grade
    from .config.specs import specs_of
    from .scoring.grader import known_grades
    from .scoring.score import score_output
    from .stats import accuracy_text

    if isinstance(output, str):
        raise _Fail(f"{output}: scoring writes into the output; score a remote output by running its job again "
                    "(a run scores what it finished) or score a local copy")
    try:
        job = _job_for(output, job_file)
        specs = specs_of(job.extract, job.score, job.tools)
        if specs.empty:
            raise _Fail("nothing to do: the job has no [extract], no [score] and no tools (pass --job with them)")
        grades = None
        if specs.score is not None and specs.score.method == "model":
            graded = asyncio.run(grade(output, job, resolve_api_key(job)))
            click.echo(f"model grader: {graded['graded_now']} answers graded now, {graded['answers']} in all", err=True)
            grades = known_grades(output)
    except JobError as exc:
        raise _Fail(str(exc)) from None
    counts = score_output(output, specs, grades)
    line = f"{counts['rows']} rows"
    if counts.get("decidable"):
        line += (f"; accuracy {accuracy_text(counts['right'], counts['decidable'])} over all {counts['decidable']} rows "
                 "with an expected value (failed ones count as wrong)")
    if counts.get("scored"):
        line += f"; {accuracy_text(counts['score_sum'], counts['scored'])} over the {counts['scored']} scored rows"
    if counts.get("extract_errors"):
        line += f"; {counts['extract_errors']} extraction errors"
    click.echo(line)


@click.command()
@click.argument("output", type=OUTPUT)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write one self-contained page with plots (and a contact sheet for images).")
def report(output: Path | str, as_json: bool, html_file: Path | None) -> None:
    """Status, errors, finish reasons, tokens, cost, latency, retries and accuracy of OUTPUT."""
    from .report.report import report as make_report
    from .report.report import report_lines

    output = _output(output)
    if html_file is not None:
        _destination(html_file)
        try:
            from .report.html import write_html
        except ImportError as exc:  # matplotlib is an extra
            raise _Fail(f"--html needs matplotlib ({exc}): pip install 'batchkimi[report]'") from None
        for path in write_html(output, html_file):
            click.echo(f"wrote {path}", err=True)
    _print(make_report(output), report_lines, as_json)


@click.command()
@click.argument("runs", nargs=-1, type=OUTPUT)
@click.option("--latest", type=OUTPUT,
              help="Compare the two newest runs under this folder (e.g. runs/nightly): by the date in their names, else by creation.")
@click.option("--max-accuracy-drop", type=float, help="Fail (exit 5) if accuracy falls by more than this (0.02 = 2 points).")
@click.option("--max-error-rate-rise", type=float, help="Fail (exit 5) if the share of failed rows rises by more than this.")
@click.option("--significant", is_flag=True, help="Fail on an accuracy drop only when McNemar's test finds it significant (p < 0.05).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY).")
@click.option("--junit", "junit_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write JUnit XML here: one test case per gate.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a page: the figures, the gates and the flipped rows with both answers.")
@click.option("--show", "show_rows", type=click.IntRange(min=0), default=20, show_default=True,
              help="Flipped rows listed each way (in the JSON and the page).")
def compare(runs: tuple[Path | str, ...], latest: Path | str | None, max_accuracy_drop: float | None,
            max_error_rate_rise: float | None, significant: bool, as_json: bool, markdown_file: Path | None,
            junit_file: Path | None, html_file: Path | None, show_rows: int) -> None:
    """Compare two runs (BEFORE AFTER): aggregates, rows whose score flipped, and whether it is a
    regression. A comparison that cannot be made (no rows, no shared row, an accuracy gate on an
    unscored run) exits 1 saying why."""
    from .report.compare import CannotCompare, compare_lines, gates, junit, latest_two, markdown
    from .report.compare import compare as make_compare

    if latest is not None:
        if runs:
            raise click.UsageError("give two runs or --latest FOLDER, not both")
        try:
            runs = latest_two(latest)
        except CannotCompare as exc:
            raise _Fail(str(exc)) from None
    if len(runs) != 2:
        raise click.UsageError("compare needs two run outputs (BEFORE AFTER), or --latest FOLDER")
    runs = tuple(_output(run) for run in runs)
    try:
        c = make_compare(runs[0], runs[1], show=show_rows)
        verdicts = gates(c, max_accuracy_drop=max_accuracy_drop, max_error_rate_rise=max_error_rate_rise,
                         significant=significant)
    except CannotCompare as exc:
        raise _Fail(str(exc)) from None
    found = [g["message"] for g in verdicts if not g["passed"]]
    c["gates"], c["regressions"] = verdicts, found
    if markdown_file is not None:
        _destination(markdown_file).write_text(markdown(c, verdicts), encoding="utf-8")
    if junit_file is not None:
        _destination(junit_file).write_bytes(junit(c, verdicts))
    if html_file is not None:
        from .report.compare_html import write_compare_html

        write_compare_html(c, _destination(html_file))
    _print(c, compare_lines, as_json)
    if not as_json:
        for f in found:
            click.echo(f"REGRESSION: {f}", err=True)
    if c["mismatches"] and as_json:
        for m in c["mismatches"]:
            click.echo(f"WARNING: {m}", err=True)
    if found:
        sys.exit(EXIT_REGRESSION)


@click.command()
@click.argument("folder", type=OUTPUT)
@click.option("--last", type=click.IntRange(min=1), default=7, show_default=True, help="How many of the newest runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the trend as JSON.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a page: accuracy with its interval and the error rate over the runs, and the table.")
def trend(folder: Path | str, last: int, as_json: bool, html_file: Path | None) -> None:
    """The last runs under FOLDER (a nightly job's output folder): accuracy with its 95% interval,
    error rate, median latency and cost, oldest first; a partial run, or one that ran something
    other than the newest, is marked."""
    from .report.compare import CannotCompare, trend_lines
    from .report.compare import trend as make_trend

    try:
        t = make_trend(folder, last)
    except CannotCompare as exc:
        raise _Fail(str(exc)) from None
    if html_file is not None:
        from .report.compare_html import write_trend_html

        write_trend_html(t, _destination(html_file))
    _print(t, trend_lines, as_json)


@click.command()
@click.argument("output", type=OUTPUT)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "openai-batch"]), default="jsonl", show_default=True,
              help="JSON Lines, CSV, or OpenAI Batch API output lines.")
@click.option("--output", "dest", type=click.Path(dir_okay=False, path_type=Path), help="Write here (default: stdout).")
def export(output: Path | str, fmt: str, dest: Path | None) -> None:
    """Write OUTPUT's rows (with their scores) as JSONL, CSV or OpenAI Batch output, streamed."""
    from .report.export import export as do_export

    output = _output(output)
    if dest is None:
        n = do_export(output, fmt, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        tmp = _destination(dest).with_name(f".{dest.name}.tmp")
        with open(tmp, "wb") as fh:
            n = do_export(output, fmt, fh)
        tmp.replace(dest)
    click.echo(f"{n} rows written" + (f" to {dest}" if dest else ""), err=True)


COMMANDS = [show, score, report, compare, trend, export]
