"""Every job setting, declared once: its group, what it means, and whether it has a flag.

Its type and default are the :class:`~batchkimi.config.job.Job` field's own; its flag, when it
has one, is its key with dashes (``max_cost_usd`` is ``--max-cost-usd``; a few older spellings
stay as aliases). From this table come the job file's type checks (:mod:`.load`), the command
line's options (:mod:`batchkimi.cli`) and the README's settings table, which a test holds
against it (``python -m batchkimi.config.settings`` prints it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .job import Job

GROUPS = ("input", "media", "output", "endpoint", "request", "limits", "timeouts", "run", "ray", "budget", "after the run")


@dataclass(frozen=True)
class Setting:
    key: str
    group: str
    help: str
    flag: bool = False  # a command-line flag of the same name (--key-with-dashes)
    aliases: tuple[str, ...] = ()  # older flag spellings still accepted
    choices: tuple[str, ...] = ()
    default_text: str | None = None  # how the default reads when the field's default says too little
    kind: str = ""  # int | float | bool | str | list | table | tools | prices | any (from the Job field)

    @property
    def flag_name(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def default(self) -> Any:
        f = _FIELDS[self.key]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    @property
    def default_shown(self) -> str:
        if self.default_text is not None:
            return self.default_text
        value = self.default
        if value is None or value == () or value == {}:
            return "none"
        if isinstance(value, tuple):
            return ", ".join(value)
        return f"{value:g}" if isinstance(value, float) else str(value)


_FIELDS = {f.name: f for f in dataclasses.fields(Job)}

_DECLARED = [
    # input
    Setting("input", "input", "JSONL, JSONL.gz, Parquet (file or folder of files), an OpenAI Batch API file, or a folder "
            "of images and videos", flag=True),
    Setting("input_format", "input", "auto (by name and content), jsonl, parquet, openai_batch or folder",
            choices=("auto", "jsonl", "parquet", "openai_batch", "folder")),
    Setting("id_column", "input", "the id column; without one, ids are row-<position>", flag=True),
    Setting("prompt_column", "input", "the column holding each row's prompt"),
    Setting("system_column", "input", "the column holding a row's system prompt (wins over system)"),
    Setting("messages_column", "input", "the column holding a row's whole conversation (OpenAI chat messages)"),
    Setting("keep_columns", "input", "input columns copied to the output (renamed input_<name> if they clash)", flag=True),
    Setting("limit", "input", "only the first N rows (a later run without it resumes)", flag=True, default_text="all"),
    Setting("samples", "input", "send each row this many times, one output row per sample (pass@k, maj@k)", flag=True),
    Setting("include", "input", "a folder input: only paths matching these shell patterns ('*.jpg'; * crosses /)"),
    Setting("exclude", "input", "a folder input: skip paths matching these patterns"),
    # media
    Setting("image_columns", "media", "columns naming a row's images (a path, a URL, bytes, or a list)"),
    Setting("video_columns", "media", "columns naming a row's videos"),
    Setting("media_root", "media", "the folder local image and video paths resolve in; none may leave it", flag=True,
            default_text="the dataset's folder"),
    Setting("media_url_prefix", "media", "send <prefix>/<path under media_root> URLs instead of the files' bytes", flag=True),
    Setting("max_image_side", "media", "downscale images whose longest side is longer (pixels; Kimi recommends at most 4096)",
            flag=True),
    Setting("max_request_mb", "media", "Kimi's limit on one request body; a row over it is invalid"),
    Setting("max_mb_in_flight", "media", "request bytes held at once, job-wide (rows with media wait for room)"),
    # output
    Setting("output", "output", "the output folder (Parquet parts and _manifest.json); {date} and {job} are filled in",
            flag=True),
    Setting("rows_per_part", "output", "rows per Parquet part at most"),
    Setting("flush_interval_s", "output", "seconds before the journal becomes a part, at most"),
    Setting("storage", "output", "options for an object store's filesystem (fsspec's: endpoint_url, profile, anon, "
            "client_kwargs...), for input and output URLs; a key's value that may be a secret is never written out"),
    # endpoint
    Setting("base_url", "endpoint", "any OpenAI-compatible URL; 'simulator' starts the built-in simulator for the run",
            flag=True),
    Setting("api_key_env", "endpoint", "the environment variable holding the API key", flag=True),
    Setting("api_key_file", "endpoint", "a file holding the API key", flag=True),
    Setting("ca_file", "endpoint", "a CA certificate (PEM) to trust besides the system's: a proxy, a test server"),
    Setting("simulator", "endpoint", "the built-in simulator's settings (see The simulator)"),
    # request
    Setting("model", "request", "kimi-k2.6, kimi-k2.5, or a TokenHub endpoint id (ep-...)", flag=True),
    Setting("ep_model", "request", "the model a TokenHub endpoint id serves: its rules (video or not) and prices apply",
            flag=True, choices=("kimi-k2.6", "kimi-k2.5")),
    Setting("prompt_template", "request", "{column} placeholders over each row ({{ and }} for literal braces)", flag=True,
            aliases=("--prompt",)),
    Setting("system", "request", "a system prompt for every row", flag=True),
    Setting("thinking", "request", "enabled or disabled (--thinking/--no-thinking); unset: Kimi's default, enabled",
            flag=True, choices=("enabled", "disabled")),
    Setting("thinking_keep", "request", "'all' passes the history's reasoning back to the model"),
    Setting("stream", "request", "stream answers", flag=True, default_text="when thinking is on"),
    Setting("include_usage", "request", "send stream_options.include_usage", default_text="off for Kimi, on elsewhere"),
    Setting("max_tokens", "request", "the answer's budget, reasoning included; with thinking on, 16,000 or more",
            flag=True, default_text="32768 with thinking"),
    Setting("temperature", "request", "Kimi fixes it (1.0 thinking, 0.6 not): leave unset"),
    Setting("top_p", "request", "Kimi fixes it at 0.95: leave unset"),
    Setting("n", "request", "Kimi fixes it at 1: leave unset"),
    Setting("presence_penalty", "request", "Kimi fixes it at 0: leave unset"),
    Setting("frequency_penalty", "request", "Kimi fixes it at 0: leave unset"),
    Setting("tools", "request", "OpenAI function tools ([[tools]] tables)"),
    Setting("tool_choice", "request", "none, auto (required or a function: not with thinking on)"),
    Setting("response_format", "request", '{type = "json_object"} for JSON mode'),
    Setting("stop", "request", "a string or up to 5 strings"),
    Setting("extra_body", "request", "more body keys sent as they are"),
    Setting("kimi_rules", "request", "apply Kimi's request rules", default_text="on at TokenHub and the simulator"),
    # limits
    Setting("concurrency", "limits", "requests in flight at most", flag=True),
    Setting("rpm", "limits", "requests per minute (your account's limit); 0: adapt to 429s", flag=True),
    Setting("tpm", "limits", "tokens per minute; 0: no client-side cap", flag=True),
    Setting("max_attempts", "limits", "attempts per row at most", flag=True),
    Setting("max_retry_time_s", "limits", "seconds a row may spend retrying"),
    Setting("backoff_base_s", "limits", "the first backoff, doubling"),
    Setting("backoff_max_s", "limits", "the longest backoff"),
    Setting("max_retry_after_s", "limits", "the longest Retry-After honoured"),
    Setting("max_wait_s", "limits", "a 429 asking for a longer wait (a daily quota) stops the run: exit 6, resumable",
            flag=True),
    # timeouts
    Setting("connect_timeout_s", "timeouts", "TCP and TLS connect"),
    Setting("first_byte_timeout_s", "timeouts", "a stream's first chunk"),
    Setting("idle_timeout_s", "timeouts", "the longest gap between two stream chunks"),
    Setting("attempt_timeout_s", "timeouts", "one attempt, whole"),
    # run
    Setting("retry", "run", "what a rerun sends again besides transient failures: truncated, refused, errors, all",
            flag=True, default_text="transient failures only"),
    Setting("stop_after_failures", "run", "stop when the first N rows all fail alike before anything succeeded; 0: never",
            flag=True),
    Setting("grace_s", "run", "seconds requests in flight get after a stop"),
    Setting("event_loop", "run", "auto (uvloop where installed), uvloop or asyncio", flag=True,
            choices=("auto", "uvloop", "asyncio")),
    # ray
    Setting("engine", "ray", "local, or ray: the requests go from a Ray cluster's actors", flag=True,
            choices=("local", "ray")),
    Setting("ray_address", "ray", "with engine ray: auto, host:port or ray://host:10001", flag=True,
            default_text="start one on this machine"),
    Setting("ray_actors", "ray", "with engine ray: actors sending requests", flag=True, default_text="one per CPU but one"),
    Setting("ray_block_rows", "ray", "with engine ray: rows an actor takes at once (the unit of commit)"),
    # budget
    Setting("max_cost_usd", "budget", "a ceiling on what the output costs, every run together (USD at the job's prices)",
            flag=True, aliases=("--max-cost",)),
    Setting("max_total_tokens", "budget", "the same for tokens (prompt and completion)", flag=True,
            aliases=("--max-tokens-total",)),
    Setting("prices", "budget", "model = [input_miss, input_hit, output] USD per 1M tokens",
            default_text="Moonshot's list prices for kimi-k2.6 and kimi-k2.5"),
    # after the run
    Setting("extract", "after the run", "how to pull a value out of each answer (see Labels, scores, reports)"),
    Setting("score", "after the run", "how to score it against an expected column"),
]


def _kind(tp: Any) -> str:
    """A Job field's kind, from its annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if len(args) == 1:
            return _kind(args[0])
        return "any"
    origin = typing.get_origin(tp) or tp
    if origin is tuple:
        return "list" if typing.get_args(tp)[:1] == (str,) else "tools"
    if origin in (dict, Mapping) or origin is typing.get_origin(Mapping[str, Any]):
        value = typing.get_args(tp)[1:2]
        return "prices" if value and typing.get_origin(value[0]) is tuple else "table"
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(origin, "any")


_HINTS = typing.get_type_hints(Job)
SETTINGS: dict[str, Setting] = {s.key: dataclasses.replace(s, kind=_kind(_HINTS[s.key])) for s in _DECLARED}
FLAGS: tuple[Setting, ...] = tuple(s for s in SETTINGS.values() if s.flag)
assert set(SETTINGS) == set(_FIELDS), sorted(set(SETTINGS) ^ set(_FIELDS))  # every key declared once


def settings_table() -> str:
    """The README's table of every job key, by group: its flag, its default, what it means."""
    rows = ["| job key | flag | default | meaning |", "|---|---|---|---|"]
    for group in GROUPS:
        rows.append(f"| **{group}** | | | |")
        for s in SETTINGS.values():
            if s.group != group:
                continue
            flag = ""
            if s.flag:
                flag = "`--thinking/--no-thinking`" if s.key == "thinking" else (
                    f"`{s.flag_name}/--no-{s.flag_name[2:]}`" if s.kind == "bool" else f"`{s.flag_name}`")
                flag += "".join(f" (`{a}`)" for a in s.aliases)
            rows.append(f"| `{s.key}` | {flag} | {s.default_shown} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
