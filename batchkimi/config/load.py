"""Job files and flags into a checked :class:`~batchkimi.config.job.Job`; the API key.

Precedence, highest first::

    command-line flag  >  job file key  >  environment (BATCHKIMI_BASE_URL)  >  default

This module is the only one that reads the environment, and the key never enters a Job.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import kimi
from ..errors import ConfigError, MissingKeyError
from ..kimi import CONTEXT_LIMIT_TOKENS, DEFAULT_PRICES, FIXED_PARAMS
from ..storage.location import filesystem, is_url, redact
from .job import Job
from .settings import SETTINGS
from .specs import specs_of

RETRY_CHOICES = ("truncated", "refused", "errors", "all")  # what `retry` may ask a rerun to send (policy.rerun)


def check_retry(values: Iterable[str]) -> tuple[str, ...]:
    """``retry`` as given (a list, or words separated by commas); ValueError naming the bad word."""
    out = []
    for v in values:
        if v not in RETRY_CHOICES:
            raise ValueError(f"{v!r} is not one of {', '.join(RETRY_CHOICES)}")
        out.append(v)
    return tuple(dict.fromkeys(out))

_FIELDS = {f.name: f for f in dataclasses.fields(Job)}
_PATH_KEYS = ("input", "output", "api_key_file", "media_root", "ca_file")
# Keys a job file may still hold from an older batchkimi: what replaced them.
_REPLACED = {"retry_errors": "retry = [...] (truncated, refused, errors, all): a rerun re-sends transient "
                             "failures by default, and these on request"}


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/*)")  # two letters at least: not a Windows drive


def _local(key: str, value: Any, where: str) -> Any:
    """A path key's value as a local path: ``file://`` URLs become paths; a URL of another
    scheme, or a path that only looks like one (``s3:/bucket``), is refused in one line, never
    created as a local folder named ``s3:``."""
    if not isinstance(value, str):
        return value
    m = _SCHEME.match(value)
    if m is None:
        return value
    scheme, slashes = m.group(1).lower(), m.group(2)
    if scheme == "file" and slashes.startswith("//"):
        rest = value[m.end() - len(slashes) + 2:]
        host, _, local = rest.partition("/")
        if host not in ("", "localhost"):
            raise ConfigError(f"{key} = {value!r} ({where}): a file:// URL on another host ({host}) cannot be read here")
        return urllib.parse.unquote("/" + local)
    if slashes == "//":
        if key in ("input", "output"):
            filesystem(value)  # a scheme no filesystem reaches is one line now, naming what to install
            return value
        raise ConfigError(f"{key} = {redact(value)!r} ({where}): {key} must be a local path; a {scheme}:// URL is "
                          "read for input and output only")
    raise ConfigError(f"{key} = {value!r} ({where}) looks like a {scheme}:// URL with a slash missing; for a local "
                      f"path of that name write ./{value}")


def load_job(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Job:
    """Read a job file (optional), apply ``overrides`` (flags; None values are ignored), check it."""
    values: dict[str, Any] = {}
    where = "the command line"
    if path is not None:
        where = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"job file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"job file {path} is not valid TOML: {exc}") from None
        base = Path(path).resolve().parent
        for key, value in raw.items():
            values[key] = _local(key, _coerce(key, value, where), where) if key in _PATH_KEYS else _coerce(key, value, where)
        for key in _PATH_KEYS:
            if isinstance(values.get(key), str) and not is_url(values[key]) and not Path(values[key]).is_absolute():
                values[key] = os.path.normpath(base / values[key])
    env_base = os.environ.get("BATCHKIMI_BASE_URL")
    if env_base and "base_url" not in values:
        values["base_url"] = env_base
    for key, value in (overrides or {}).items():
        if value is not None:
            value = _coerce(key, value, "the command line")
            values[key] = _local(key, value, "the command line") if key in _PATH_KEYS else value
    if isinstance(values.get("output"), str) and "{" in values["output"]:
        # a nightly job writes each night's run beside the last: output = "runs/{job}/{date}"
        today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        values["output"] = values["output"].replace("{date}", today).replace("{job}", Path(path).stem if path else "job")
    job = Job(**values)
    check_job(job)
    return job


def _coerce(key: str, value: Any, where: str) -> Any:
    if key in _REPLACED:
        raise ConfigError(f"job key '{key}' in {where} is gone: use {_REPLACED[key]}")
    if key not in _FIELDS:
        hint = difflib.get_close_matches(key, _FIELDS, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown job key '{key}' in {where}{extra}")

    def bad(kind: str) -> ConfigError:
        return ConfigError(f"job key '{key}' in {where} must be {kind}, got {value!r}")

    kind = SETTINGS[key].kind  # its values are checked by check_job, with the job's other keys
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise bad("a whole number")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad("a number")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise bad("a list of patterns" if key in ("include", "exclude")
                      else "a list of truncated, refused, errors, all" if key == "retry" else "a list of column names")
        if key == "retry":
            try:
                return check_retry(value)
            except ValueError as exc:
                raise ConfigError(f"job key 'retry' in {where}: {exc}") from None
        return tuple(value)
    if kind == "tools":
        if not isinstance(value, list | tuple) or not all(isinstance(t, dict) for t in value):
            raise bad("a list of tool objects")
        return tuple(value)
    if kind == "table":
        if not isinstance(value, dict):
            raise bad("a table")
        return dict(value)
    if kind == "prices":
        if not isinstance(value, dict):
            raise bad("a table of model = [input_miss, input_hit, output] USD per 1M tokens")
        prices = dict(DEFAULT_PRICES)
        for model, triple in value.items():
            if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(x, int | float) for x in triple)):
                raise ConfigError(f"job key 'prices.{model}' in {where} must be [input_miss, input_hit, output]")
            prices[model] = (float(triple[0]), float(triple[1]), float(triple[2]))
        return prices
    return value  # tool_choice, response_format, stop: checked in check_job


def check_job(job: Job) -> None:
    """Refuse, before anything is read or sent, a job that cannot work or that Kimi would reject."""
    if job.input_format not in ("auto", "jsonl", "parquet", "openai_batch", "folder"):
        raise ConfigError(f"input_format must be auto, jsonl, parquet, openai_batch or folder, got {job.input_format!r}")
    if job.event_loop not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"event_loop must be auto, uvloop or asyncio, got {job.event_loop!r}")
    if job.engine not in ("local", "ray"):
        raise ConfigError(f"engine must be local or ray, got {job.engine!r}")
    if job.ray_block_rows < 1 or job.ray_actors < 0:
        raise ConfigError(f"ray_block_rows must be at least 1 and ray_actors at least 0 (0: one per CPU but one), "
                          f"got {job.ray_block_rows} and {job.ray_actors}")
    if job.max_image_side is not None and job.max_image_side < kimi.MIN_IMAGE_SIDE:
        raise ConfigError(f"max_image_side must be at least {kimi.MIN_IMAGE_SIDE} pixels, got {job.max_image_side}")
    for key in ("max_request_mb", "max_mb_in_flight"):
        if getattr(job, key) <= 0:
            raise ConfigError(f"{key} must be more than 0, got {getattr(job, key):g}")
    if job.media_url_prefix is not None and not job.media_url_prefix.startswith(("http://", "https://")):
        raise ConfigError(f"media_url_prefix must start with http:// or https://, got {job.media_url_prefix!r}")
    both = set(job.image_columns) & set(job.video_columns)
    if both:
        raise ConfigError(f"{', '.join(sorted(both))} cannot be both an image and a video column")
    if job.thinking not in (None, "enabled", "disabled"):
        raise ConfigError(f"thinking must be 'enabled' or 'disabled', got {job.thinking!r}")
    if job.thinking_keep not in (None, "all"):
        raise ConfigError(f"thinking_keep must be 'all' or unset, got {job.thinking_keep!r}")
    for key in ("concurrency", "max_attempts", "rows_per_part"):
        if getattr(job, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(job, key)}")
    if job.stop_after_failures < 0:
        raise ConfigError(f"stop_after_failures must be 0 (never) or more, got {job.stop_after_failures}")
    owned = sorted(set(job.extra_body) & kimi.JOB_OWNED_KEYS)
    if owned:
        raise ConfigError(f"extra_body may not set {', '.join(owned)}: use the job key of the same name, "
                          "so that the checks and the resume key see it")
    for key in ("rpm", "tpm"):
        if getattr(job, key) < 0:
            raise ConfigError(f"{key} must be 0 (no cap) or more, got {getattr(job, key)}")
    if job.limit is not None and job.limit < 0:
        raise ConfigError(f"limit must be 0 or more, got {job.limit}")
    if isinstance(job.samples, bool) or not isinstance(job.samples, int) or not 1 <= job.samples <= 1000:
        raise ConfigError(f"samples must be a whole number from 1 to 1000, got {job.samples!r}")
    if job.samples > 1 and job.engine == "ray":
        raise ConfigError("samples > 1 runs on the local engine only for now: drop engine = 'ray' or set samples = 1")
    if job.samples > 1 and job.input_format == "folder":
        raise ConfigError("samples > 1 needs a JSONL or Parquet input (a folder's files are captioned once each)")
    if job.max_tokens is not None and not 1 <= job.max_tokens <= CONTEXT_LIMIT_TOKENS:
        raise ConfigError(f"max_tokens must be between 1 and {CONTEXT_LIMIT_TOKENS}, got {job.max_tokens}")
    for key in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s", "attempt_timeout_s"):
        if getattr(job, key) <= 0:
            raise ConfigError(f"{key} must be more than 0 seconds")
    if not job.base_url.startswith(("http://", "https://")) and not job.uses_simulator:
        raise ConfigError(f"base_url must start with http:// or https://, or be 'simulator'; got {job.base_url!r}")
    if job.response_format is not None and not (
        isinstance(job.response_format, dict) and isinstance(job.response_format.get("type"), str)
    ):
        raise ConfigError('response_format must be a table such as {type = "json_object"}')
    if job.stop is not None and not (
        isinstance(job.stop, str) or (isinstance(job.stop, list) and all(isinstance(s, str) for s in job.stop))
    ):
        raise ConfigError("stop must be a string or a list of strings")
    if job.tool_choice is not None and not isinstance(job.tool_choice, str | dict):
        raise ConfigError("tool_choice must be 'none', 'auto', 'required' or a function table")
    if job.max_cost_usd < 0 or job.max_total_tokens < 0:
        raise ConfigError("max_cost_usd and max_total_tokens must be 0 (no budget) or more")
    if job.ep_model is not None:
        if job.ep_model not in kimi.MODELS:
            raise ConfigError(f"ep_model must be one of {', '.join(kimi.MODELS)}, got {job.ep_model!r}")
        if not job.model.startswith("ep-"):
            raise ConfigError(f"ep_model names the model a TokenHub endpoint id (ep-...) serves; model is {job.model!r}")
    if job.max_cost_usd and job.model not in job.price_table:
        also = (f", or say which model {job.model} serves with ep_model = \"kimi-k2.6\""
                if job.model.startswith("ep-") else "")
        raise ConfigError(f"max_cost_usd needs a price for {job.model}: add it to the prices table "
                          f"([input_miss, input_hit, output] USD per 1M tokens){also}")
    specs_of(job.extract, job.score, job.tools)  # raises ConfigError naming the key
    if job.applies_kimi_rules:
        _check_kimi_rules(job)


def job_notices(job: Job) -> list[str]:
    """Warnings about a job that is allowed but likely to waste money; said at start and in --dry-run."""
    notes = []
    if job.applies_kimi_rules:
        note = kimi.thinking_budget_note(job.max_tokens, job.thinking_on, "the job")
        if note:
            notes.append(note)
    if (job.max_cost_usd or job.max_total_tokens) and job.effective_max_tokens is None:
        notes.append("a budget with no max_tokens counts every request at its worst case, the whole context "
                     f"window ({CONTEXT_LIMIT_TOKENS:,} tokens): set max_tokens to let more requests run at once")
    return notes


def _check_kimi_rules(job: Job) -> None:
    params = {key: getattr(job, key) for key in ("temperature", *FIXED_PARAMS, "tool_choice", "stop")}
    params.update(job.extra_body)  # extra_body goes out with every row: it obeys the same rules
    violation = kimi.rule_violation(params, job.thinking_on)
    if violation is None:
        return
    key, message = violation
    where = f"extra_body.{key}" if key in job.extra_body else key
    mode = "thinking" if job.thinking_on else "non-thinking"
    advice = "Use 'auto', or set thinking = 'disabled'." if key == "tool_choice" else f"Leave {where} unset."
    raise ConfigError(f"{where} = {params[key]!r} would be refused by Kimi in {mode} mode: '{message}'. {advice}")


def resolve_api_key(job: Job) -> str:
    """The API key, from ``api_key_file`` if the job names one, else from ``api_key_env``.

    Raises :class:`MissingKeyError` naming the variable or file to set. The simulator needs
    no key: a run against it uses the one from the environment if set, else a local one.
    """
    if job.api_key_file:
        path = Path(job.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MissingKeyError(f"cannot read the API key file {path}: {exc.strerror}") from None
        if not key:
            raise MissingKeyError(f"the API key file {path} is empty")
        return key
    key = os.environ.get(job.api_key_env, "").strip()
    if key:
        return key
    if job.uses_simulator:
        return "sim-local-key"
    raise MissingKeyError(
        f"no API key: set the environment variable {job.api_key_env} (export {job.api_key_env}=...), "
        "or name a file holding it with api_key_file"
    )
