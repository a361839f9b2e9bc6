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
from .config.settings import FLAGS, SETTINGS
from .errors import JobError, MissingKeyError
from .exit_codes import EXIT_FAILED_ROWS, EXIT_INTERRUPTED, EXIT_USAGE


def _option(key: str, *, required: bool = False, help: str | None = None) -> Callable[[Any], Any]:
    """The flag of job key ``key``, made from its one declaration (:mod:`batchkimi.config.settings`)."""
    s = SETTINGS[key]
    names = [s.flag_name, *s.aliases]
    kw: dict[str, Any] = {"default": None, "required": required, "help": help or s.help[:1].upper() + s.help[1:] + ".",
                          "show_default": None if required or s.default_shown == "none" else s.default_shown}
    if key == "thinking":
        names = ["--thinking/--no-thinking"]
    elif s.kind == "bool":
        names = [f"{s.flag_name}/--no-{s.flag_name[2:]}"]
    elif s.choices:
        kw["type"] = click.Choice(s.choices)
    elif s.kind in ("int", "float"):
        kw["type"] = int if s.kind == "int" else float
    elif s.kind == "list":
        kw["multiple"] = True
        kw["help"] = kw["help"][:-1] + " (repeat it, or separate with commas)."
    return click.option(*names, key, **kw)


def _options(*keys: str) -> Callable[[Any], Any]:
    def apply(f: Any) -> Any:
        for key in reversed(keys):
            f = _option(key)(f)
        return f

    return apply


_QUIET = click.option("--quiet", is_flag=True, help="No progress bar.")
_JSON_SUMMARY = click.option("--json-summary", is_flag=True, help="Print the summary as JSON on stdout.")
_OVERWRITE = click.option("--overwrite", is_flag=True, help="Delete the output directory first and start fresh.")
_CAPTION_KEYS = ("model", "system", "base_url", "stream", "thinking", "max_tokens", "max_image_side", "concurrency", "rpm",
                 "tpm", "media_url_prefix", "limit", "max_cost_usd", "max_total_tokens", "max_wait_s", "retry",
                 "event_loop", "engine", "ray_address", "ray_actors")


@click.group()
@click.version_option(package_name="batchkimi")
def cli() -> None:
    """Run large batches of Kimi chat completions on Tencent Cloud TokenHub."""


@cli.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_options(*(s.key for s in FLAGS))
@_OVERWRITE
@click.option("--dry-run", is_flag=True, help="Check every row, show the first request; send nothing.")
@_QUIET
@_JSON_SUMMARY
def run(job_file: Path | None, dry_run: bool, quiet: bool, overwrite: bool, json_summary: bool, **flags: Any) -> None:
    """Run JOB_FILE (a TOML job), with any key overridden by its flag; or flags alone."""
    _go(job_file, flags, dry_run=dry_run, quiet=quiet, overwrite=overwrite, json_summary=json_summary)


@cli.command()
@click.argument("folder")
@_option("output", required=True)
@_option("prompt_template", help="What to ask about each file, e.g. 'Describe this image in one sentence.' ({id} is "
                                 "its path); required unless --job sets prompt_template.")
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path), help="A job file for every other key.")
@_options("include", "exclude", *_CAPTION_KEYS)
@_OVERWRITE
@click.option("--dry-run", is_flag=True, help="Walk the folder, check every file, show the first request; send nothing.")
@_QUIET
@_JSON_SUMMARY
def caption(folder: str, job_file: Path | None, dry_run: bool, quiet: bool, overwrite: bool, json_summary: bool,
            **flags: Any) -> None:
    """Caption every image and video under FOLDER (recursively; the type comes from each
    file's bytes). Rerun the same command to send only new and changed files."""
    flags["input"] = str(folder)
    flags["input_format"] = "folder"
    _go(job_file, flags, dry_run=dry_run, quiet=quiet, overwrite=overwrite, json_summary=json_summary)


def _go(job_file: Path | None, flags: dict[str, Any], *, dry_run: bool, quiet: bool, overwrite: bool,
        json_summary: bool) -> None:
    if flags.get("thinking") is not None:
        flags["thinking"] = "enabled" if flags["thinking"] else "disabled"
    for key, value in list(flags.items()):
        if isinstance(value, tuple):  # a list key's flag, repeatable: the values joined, as the job file's list
            flags[key] = ",".join(value) if value else None
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
                   "columns. The same command sends the transient failures again; refusals and truncated rows only "
                   "when asked (--retry refused,truncated), or with a larger --max-tokens for truncated rows.", err=True)
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
@click.option("--shape", type=click.Choice(["kimi", "short"]), default="kimi", show_default=True,
              help="kimi: answer lengths and times with Kimi's shape (long, heavy-tailed); short: short instant answers.")
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Run time this many times faster (lengths, usage and order of events unchanged).")
@click.option("--latency-ms", type=float, default=None, help="Time to the first token (default: the shape's, 1500 for kimi).")
@click.option("--rtt-ms", type=float, default=0.0, help="A modelled network round trip: per request, and per new connection's handshakes.")
@click.option("--tokens-per-s", type=float, default=None, help="Decode rate, streaming or not (0: as fast as possible; default: the shape's, 60 for kimi).")
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
@click.option("--endpoint", "endpoint_list", multiple=True,
              help="Serve a TokenHub endpoint id as a model: ep-7f3a9=kimi-k2.6 (repeatable).")
@click.option("--tls", is_flag=True, help="Serve HTTPS, with a certificate from a fresh test CA (needs trustme).")
@click.option("--ca-out", type=click.Path(dir_okay=False), help="With --tls: write the test CA here, for a client's ca_file.")
def simulate(host: str, port: int, accept_keys: tuple[str, ...], endpoint_list: tuple[str, ...], ca_out: str | None,
             **options: Any) -> None:
    """Serve a TokenHub/Kimi simulator until Ctrl-C: POST /v1/chat/completions, GET /v1/models, GET /stats."""
    from .simulator import SimConfig, serve

    endpoints = {}
    for item in endpoint_list:
        ep, sep, model = item.partition("=")
        if not sep or not ep.startswith("ep-"):
            raise _Fail(f"--endpoint takes ep-<id>=<model>, e.g. ep-7f3a9=kimi-k2.6; got {item!r}")
        endpoints[ep] = model
    cfg = SimConfig.from_mapping({"host": host, "port": port, **{k: v for k, v in options.items() if v is not None},
                                  "api_keys": accept_keys or None, "endpoints": endpoints})
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
