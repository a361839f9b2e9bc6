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


@click.command()
@click.argument("output", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--head", type=int, default=5, show_default=True, help="Rows to show.")
def show(output: Path, head: int) -> None:
    """Counts by status, the first rows and the failed rows of a run's OUTPUT directory."""
    from .output.sink import read_results

    df = read_results(output)
    click.echo(f"{len(df)} rows")
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
@click.argument("output", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Take [extract] and [score] from this job file instead of the run's own.")
def score(output: Path, job_file: Path | None) -> None:
    """Extract and score OUTPUT's answers again (after changing a scorer). Nothing is sent,
    except, for a model-graded score, the grading requests of answers not graded yet."""
    import asyncio

    from .api import grade
    from .config.specs import specs_of
    from .scoring.grader import known_grades
    from .scoring.score import score_output
    from .stats import accuracy_text

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
    if counts.get("scored"):
        line += f"; accuracy {accuracy_text(counts['score_sum'], counts['scored'])}"
    if counts.get("extract_errors"):
        line += f"; {counts['extract_errors']} extraction errors"
    click.echo(line)


@click.command()
@click.argument("output", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write one self-contained page with plots (and a contact sheet for images).")
def report(output: Path, as_json: bool, html_file: Path | None) -> None:
    """Status, errors, finish reasons, tokens, cost, latency, retries and accuracy of OUTPUT."""
    from .report.report import report as make_report
    from .report.report import report_lines

    if html_file is not None:
        try:
            from .report.html import write_html
        except ImportError as exc:  # matplotlib is an extra
            raise _Fail(f"--html needs matplotlib ({exc}): pip install 'batchkimi[report]'") from None
        for path in write_html(output, html_file):
            click.echo(f"wrote {path}", err=True)
    r = make_report(output)
    if as_json:
        click.echo(json.dumps(r, indent=2, default=str))
    else:
        for line in report_lines(r):
            click.echo(line)


@click.command()
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--latest", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Compare the two newest runs under this folder (e.g. runs/nightly).")
@click.option("--max-accuracy-drop", type=float, help="Fail (exit 5) if accuracy falls by more than this (0.02 = 2 points).")
@click.option("--max-error-rate-rise", type=float, help="Fail (exit 5) if the share of failed rows rises by more than this.")
@click.option("--significant", is_flag=True, help="Fail on an accuracy drop only when McNemar's test finds it significant (p < 0.05).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare(runs: tuple[Path, ...], latest: Path | None, max_accuracy_drop: float | None,
            max_error_rate_rise: float | None, significant: bool, as_json: bool) -> None:
    """Compare two runs (BEFORE AFTER): aggregates, rows whose score flipped, and whether it is a regression."""
    from .report.report import compare as make_compare
    from .report.report import compare_lines, latest_two, regressions

    if latest is not None:
        if runs:
            raise click.UsageError("give two runs or --latest FOLDER, not both")
        try:
            runs = latest_two(latest)
        except FileNotFoundError as exc:
            raise _Fail(str(exc)) from None
    if len(runs) != 2:
        raise click.UsageError("compare needs two run outputs (BEFORE AFTER), or --latest FOLDER")
    c = make_compare(runs[0], runs[1])
    found = regressions(c, max_accuracy_drop=max_accuracy_drop, max_error_rate_rise=max_error_rate_rise,
                        significant=significant)
    c["regressions"] = found
    if as_json:
        click.echo(json.dumps(c, indent=2, default=str))
    else:
        for line in compare_lines(c):
            click.echo(line)
        for f in found:
            click.echo(f"REGRESSION: {f}", err=True)
    if found:
        sys.exit(EXIT_REGRESSION)


@click.command()
@click.argument("output", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "openai-batch"]), default="jsonl", show_default=True,
              help="JSON Lines, CSV, or OpenAI Batch API output lines.")
@click.option("--output", "dest", type=click.Path(dir_okay=False, path_type=Path), help="Write here (default: stdout).")
def export(output: Path, fmt: str, dest: Path | None) -> None:
    """Write OUTPUT's rows (with their scores) as JSONL, CSV or OpenAI Batch output, streamed."""
    from .report.export import export as do_export

    if dest is None:
        n = do_export(output, fmt, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        tmp = dest.with_name(f".{dest.name}.tmp")
        with open(tmp, "wb") as fh:
            n = do_export(output, fmt, fh)
        tmp.replace(dest)
    click.echo(f"{n} rows written" + (f" to {dest}" if dest else ""), err=True)


COMMANDS = [show, score, report, compare, export]
