"""``batchkimi``: thin click glue over the library.

Exit codes: 0 every row ok; 1 a job-level error; 2 usage; 3 finished with failed rows;
4 stopped at its budget; 5 ``compare`` found a regression; 6 the account must wait (a quota's
Retry-After longer than max_wait_s); 130 interrupted (run the same command to resume).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli_common import Fail as _Fail
from .cli_outputs import COMMANDS
from .config import Job, load_job, resolve_api_key
from .errors import JobError, MissingKeyError
from .exit_codes import EXIT_FAILED_ROWS, EXIT_INTERRUPTED, EXIT_USAGE

# Options that more than one command takes, written once.
_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "base-url": click.option("--base-url", help="OpenAI-compatible base URL, or 'simulator' for the built-in one.",
                  show_default="https://tokenhub-intl.tencentcloudmaas.com/v1"),
    "system": click.option("--system", help="A system prompt for every row."),
    "stream": click.option("--stream/--no-stream", default=None, help="Stream answers.", show_default="when thinking is on"),
    "thinking": click.option("--thinking/--no-thinking", default=None, help="Kimi's thinking mode.", show_default="Kimi's default, on"),
    "max-tokens": click.option("--max-tokens", type=int, help="Answer budget (reasoning + answer).", show_default="32768 with thinking"),
    "concurrency": click.option("--concurrency", type=int, help="Requests in flight at most.", show_default="32"),
    "rpm": click.option("--rpm", type=float, help="Requests per minute (your account's limit); 0: adapt to 429s.", show_default="0"),
    "tpm": click.option("--tpm", type=float, help="Tokens per minute (your account's limit); 0: no cap.", show_default="0"),
    "max-image-side": click.option("--max-image-side", type=int, help="Downscale images whose longest side is longer (pixels)."),
    "overwrite": click.option("--overwrite", is_flag=True, help="Delete the output directory first and start fresh."),
    "quiet": click.option("--quiet", is_flag=True, help="No progress bar."),
    "json-summary": click.option("--json-summary", is_flag=True, help="Print the summary as JSON on stdout."),
    "event-loop": click.option("--event-loop", type=click.Choice(["auto", "uvloop", "asyncio"]),
                               help="The event loop.", show_default="auto: uvloop where installed"),
    "engine": click.option("--engine", type=click.Choice(["local", "ray"]),
                           help="Send from this process, or from the actors of a Ray cluster (pip install 'batchkimi[ray]').",
                           show_default="local"),
    "ray-address": click.option("--ray-address", help="With --engine ray: the cluster ('auto', host:port, ray://host:10001).",
                                show_default="start one on this machine"),
    "ray-actors": click.option("--ray-actors", type=int, help="With --engine ray: actors sending requests.",
                               show_default="one per CPU but one"),
    "max-cost": click.option("--max-cost", "max_cost_usd", type=float,
                             help="Stop sending once this run's cost (USD, estimated, in flight counted) would pass this."),
    "max-tokens-total": click.option("--max-tokens-total", "max_total_tokens", type=int,
                                     help="Stop sending once this run's tokens (in flight counted) would pass this."),
}


def _shared(*names: str) -> Callable[[Any], Any]:
    def apply(f: Any) -> Any:
        for name in reversed(names):
            f = _OPTIONS[name](f)
        return f

    return apply


@click.group()
@click.version_option(package_name="batchkimi")
def cli() -> None:
    """Run large batches of Kimi chat completions on Tencent Cloud TokenHub."""


@cli.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "input_", help="JSONL, JSONL.gz, Parquet (file or folder) or OpenAI batch file.")
@click.option("--output", help="Output directory (Parquet parts + _manifest.json).")
@_shared("base-url")
@click.option("--model", help="kimi-k2.6 or kimi-k2.5, or a TokenHub service id (ep-...).", show_default="kimi-k2.6")
@click.option("--prompt-template", help="Template over each row, e.g. 'Classify: {text}'.")
@_shared("system", "stream", "thinking", "max-tokens", "concurrency", "rpm", "tpm")
@click.option("--limit", type=int, help="Only the first N rows.", show_default="all")
@click.option("--id-column", help="The id column; without one, ids come from row positions.", show_default="id")
@click.option("--keep-columns", help="Input columns to copy to the output, comma-separated.")
@click.option("--media-root", help="Folder that local image/video paths resolve in (none may leave it).",
              show_default="the dataset's folder")
@_shared("max-image-side")
@click.option("--api-key-env", help="Environment variable holding the API key.", show_default="TOKENHUB_API_KEY")
@click.option("--api-key-file", help="A file holding the API key.")
@click.option("--max-attempts", type=int, help="Attempts per row at most.", show_default="6")
@click.option("--stop-after-failures", type=int, help="Stop when the first N rows all fail alike; 0: never.", show_default="20")
@click.option("--retry", help="What a rerun sends again besides transient failures (comma-separated): "
              "truncated, refused, errors, all.", show_default="transient failures only")
@_shared("max-cost", "max-tokens-total", "event-loop", "engine", "ray-address", "ray-actors", "overwrite")
@click.option("--dry-run", is_flag=True, help="Check every row, show the first request; send nothing.")
@_shared("quiet", "json-summary")
def run(job_file: Path | None, input_: str | None, dry_run: bool, quiet: bool, overwrite: bool,
        json_summary: bool, **flags: Any) -> None:
    """Run JOB_FILE (a TOML job), with any key overridden by a flag; or flags alone."""
    flags["input"] = input_
    _go(job_file, flags, dry_run=dry_run, quiet=quiet, overwrite=overwrite, json_summary=json_summary)


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--output", required=True, help="Output directory (Parquet parts + _manifest.json).")
@click.option("--prompt", "prompt_template",
              help="What to ask about each file, e.g. 'Describe this image in one sentence.' ({id} is its path); "
                   "required unless --job sets prompt_template.")
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path), help="A job file for every other key.")
@click.option("--include", multiple=True, help="Only paths matching this pattern, e.g. '*.jpg' (repeatable).")
@click.option("--exclude", multiple=True, help="Skip paths matching this pattern, e.g. 'raw/*' (repeatable).")
@click.option("--model", help="kimi-k2.6 (images and videos) or kimi-k2.5 (images).", show_default="kimi-k2.6")
@click.option("--system", help="A system prompt for every file.")
@_shared("base-url", "stream", "thinking", "max-tokens", "max-image-side", "concurrency", "rpm", "tpm")
@click.option("--media-url-prefix", help="Send <prefix>/<relative path> URLs instead of the files' bytes.")
@click.option("--limit", type=int, help="Only the first N files.", show_default="all")
@_shared("max-cost", "max-tokens-total", "event-loop", "engine", "ray-address", "ray-actors", "overwrite")
@click.option("--dry-run", is_flag=True, help="Walk the folder, check every file, show the first request; send nothing.")
@_shared("quiet", "json-summary")
def caption(folder: Path, job_file: Path | None, dry_run: bool, quiet: bool, overwrite: bool, json_summary: bool,
            **flags: Any) -> None:
    """Caption every image and video under FOLDER (recursively; the type comes from each
    file's bytes). Rerun the same command to send only new and changed files."""
    flags["input"] = str(folder)
    flags["input_format"] = "folder"
    for key in ("include", "exclude"):
        flags[key] = tuple(flags[key]) or None
    _go(job_file, flags, dry_run=dry_run, quiet=quiet, overwrite=overwrite, json_summary=json_summary)


def _go(job_file: Path | None, flags: dict[str, Any], *, dry_run: bool, quiet: bool, overwrite: bool,
        json_summary: bool) -> None:
    if flags.get("thinking") is not None:
        flags["thinking"] = "enabled" if flags["thinking"] else "disabled"
    if job_file is None and not flags.get("input"):
        raise _Fail("nothing to run: give a job file (batchkimi run jobs/demo.toml) or --input DATASET "
                    "(batchkimi run --help lists the flags)")
    try:
        job = load_job(job_file, flags)
    except JobError as exc:
        raise _Fail(str(exc)) from None
    from . import api as engine

    if dry_run:
        try:
            report = engine.dry_run(job)
        except JobError as exc:
            raise _Fail(str(exc)) from None
        for line in report.lines():
            click.echo(line)
        if report.first_request is not None:
            click.echo("first request:")
            click.echo(json.dumps(report.first_request, indent=2, ensure_ascii=False))
        _note_missing_key(job)
        return

    from .progress import ProgressBar

    bar = ProgressBar(job.rpm, job.tpm, enabled=not quiet)
    try:
        summary = engine.run(job, hook=bar, overwrite=overwrite, install_signal_handlers=True)
    except JobError as exc:
        bar.close()
        raise _Fail(str(exc)) from None
    except KeyboardInterrupt:
        bar.close()
        click.echo("interrupted; run the same command to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    bar.close()
    if json_summary:
        click.echo(json.dumps(summary.as_dict()))
    for line in summary.lines():
        click.echo(line, err=json_summary)
    if summary.fatal:
        click.echo(f"stopped early: {summary.fatal}. Nothing done is lost: fix this and run the same command to resume.", err=True)
    elif summary.interrupted:
        click.echo("interrupted: run the same command to resume.", err=True)
    elif summary.wait_until is not None:
        click.echo("waiting for the account: run the same command at the time above to resume.", err=True)
    elif summary.budget_stop:
        click.echo("stopped at the budget: run the same command (with a larger budget) to go on.", err=True)
    elif summary.exit_code == EXIT_FAILED_ROWS:
        click.echo(f"some rows failed: see `batchkimi report {summary.output}` or the error_type and error_message "
                   "columns; run the same command to retry them (the output keeps one row per input row).", err=True)
    sys.exit(summary.exit_code)


def _note_missing_key(job: Job) -> None:
    """A dry run sends nothing and needs no key; say so if a real run would miss it."""
    try:
        resolve_api_key(job)
    except MissingKeyError as exc:
        click.echo(f"note: a real run needs an API key, and none was found: {exc}", err=True)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to serve on (0: any free one).")
@click.option("--rpm", type=int, default=0, help="Requests per minute per key (0: none).")
@click.option("--tpm", type=int, default=0, help="Tokens per minute per key (0: none).")
@click.option("--concurrency", type=int, default=0, help="Requests in flight per key (0: none).")
@click.option("--latency-ms", type=float, default=0.0, show_default=True, help="Time to the answer (to the first chunk when streaming).")
@click.option("--rtt-ms", type=float, default=0.0, help="A modelled network round trip: per request, and per new connection's handshakes.")
@click.option("--tokens-per-s", type=float, default=0.0, help="Streaming pace (0: as fast as possible).")
@click.option("--fail-rate", type=float, default=0.0, help="Share of requests given a random fault.")
@click.option("--overload-rate", type=float, default=0.0, help="Share of admitted requests refused as engine_overloaded.")
@click.option("--bad-tool-args-rate", type=float, default=0.0, help="Share of tool calls whose arguments break the schema.")
@click.option("--accuracy", type=float, default=0.9, help="Share of arithmetic answers that are right.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for answers and random faults (same seed, same run).")
@click.option("--error-style", type=click.Choice(["tokenhub", "moonshot"]), default="tokenhub", show_default=True,
              help="Error envelope: TokenHub's (type, code, source, request_id) or Moonshot's bare (type, message).")
@click.option("--retry-after", type=click.Choice(["seconds", "date", "none"]), default="seconds", show_default=True,
              help="Retry-After on rate-limit 429s.")
@click.option("--rate-limit-style", type=click.Choice(["tokenhub", "moonshot"]), default="tokenhub", show_default=True,
              help="429 wording: TokenHub's 'rate limit exceeded on dimension' or Moonshot's 'try again after N seconds'.")
@click.option("--accept-key", "accept_keys", multiple=True, help="Accept only these keys (repeatable; default: any).")
@click.option("--tls", is_flag=True, help="Serve HTTPS, with a certificate from a fresh test CA (needs trustme).")
@click.option("--ca-out", type=click.Path(dir_okay=False), help="With --tls: write the test CA here, for a client's ca_file.")
def simulate(host: str, port: int, accept_keys: tuple[str, ...], ca_out: str | None, **options: Any) -> None:
    """Serve a TokenHub/Kimi simulator until Ctrl-C: POST /v1/chat/completions, GET /v1/models, GET /stats."""
    from .simulator import SimConfig, serve

    cfg = SimConfig.from_mapping({"host": host, "port": port, **options, "api_keys": accept_keys or None})
    scheme = "https" if cfg.tls else "http"

    def ready(bound: int) -> None:
        trust = f"; clients trust {ca_out} (ca_file)" if cfg.tls and ca_out else ""
        click.echo(f"TokenHub simulator on {scheme}://{host}:{bound}/v1 (stats at /stats){trust}; Ctrl-C stops it", err=True)

    try:
        serve(cfg, on_ready=ready, ca_out=ca_out)
    except OSError as exc:
        raise _Fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}. Pick another --port (0: any free one).") from None


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
