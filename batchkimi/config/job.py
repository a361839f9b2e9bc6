"""The job: what to read, what to send, where to write, how fast.

A job comes from a TOML file (``jobs/*.toml``), command-line flags, or both. Precedence,
highest first::

    command-line flag  >  job file key  >  environment (BATCHKIMI_BASE_URL)  >  default

Every flag has a job key of the same name (``--max-tokens`` is ``max_tokens``). Paths in a
job file are relative to the job file's folder; paths given as flags are relative to the
current directory. The job names the *environment variable* (``api_key_env``) or the *file*
(``api_key_file``) that holds the key, never the key: this module is the only one that reads
the environment, and the key never enters a :class:`Job`.

Example::

    job = load_job(Path("jobs/demo.toml"), {"limit": 20})
    key = resolve_api_key(job)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import kimi
from ..kimi import DEFAULT_PRICES, THINKING_DEFAULT_MAX_TOKENS
from ..storage.location import is_url, redact

DEFAULT_BASE_URL = "https://tokenhub-intl.tencentcloudmaas.com/v1"
SIMULATOR = "simulator"
# Simulator settings that change when and how fast it answers, or which attempts fail, never
# what an answer says: a rehearsal with other pacing is the same job.
SIMULATOR_PACING = frozenset({
    "host", "port", "tls", "latency_ms", "rtt_ms", "tokens_per_s", "chunk_tokens", "rpm", "tpm", "concurrency",
    "window_s", "retry_after", "rate_limit_style", "fail_rate", "fail_faults", "overload_rate", "stall_s",
    "slow_first_byte_s", "error_style", "speed", "api_keys",
})


@dataclass(frozen=True)
class Job:
    """A resolved job. Every field has the name of its job key and command-line flag."""

    # input
    input: str | None = None
    input_format: str = "auto"  # auto | jsonl | parquet | openai_batch | folder
    id_column: str = "id"
    prompt_column: str = "prompt"
    system_column: str = "system"
    messages_column: str = "messages"
    keep_columns: tuple[str, ...] = ()
    limit: int | None = None
    samples: int = 1  # each row sent this many times (Kimi's n is fixed at 1), one output row per sample
    # media (images and videos)
    image_columns: tuple[str, ...] = ("image", "images")
    video_columns: tuple[str, ...] = ("video", "videos")
    media_root: str | None = None  # local paths resolve here; None: the dataset's folder
    media_url_prefix: str | None = None  # send https://cdn/<path under media_root> instead of bytes
    max_image_side: int | None = None  # downscale images whose longest side is longer
    max_request_mb: float = kimi.MAX_BODY_MB  # Kimi's limit on one request body
    max_mb_in_flight: float = 256.0  # request bytes held at once, job-wide (media rows)
    include: tuple[str, ...] = ()  # folder inputs: shell patterns over the relative path
    exclude: tuple[str, ...] = ()
    # output
    output: str | None = None
    # endpoint
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "TOKENHUB_API_KEY"
    api_key_file: str | None = None
    ca_file: str | None = None  # a CA certificate (PEM) to trust besides the system's: a proxy, a test server
    # request
    model: str = "kimi-k2.6"
    ep_model: str | None = None  # the model a TokenHub endpoint id (ep-...) serves: its rules and prices
    prompt_template: str | None = None
    system: str | None = None
    thinking: str | None = None  # enabled | disabled | None (server default: enabled)
    thinking_keep: str | None = None  # "all" passes historical reasoning back to the model
    stream: bool | None = None  # None: stream when thinking is on
    include_usage: bool | None = None  # stream_options.include_usage; None: only when kimi_rules is off
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: tuple[Any, ...] | None = None
    tool_choice: Any = None
    response_format: Any = None
    stop: Any = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    kimi_rules: bool | None = None  # None: on at TokenHub and the simulator, elsewhere for "kimi*" models
    # limits
    concurrency: int = 32
    rpm: float = 0  # requests per minute; 0 = no client-side cap (adapt to 429s)
    tpm: float = 0  # tokens per minute; 0 = no client-side cap
    max_attempts: int = 6
    max_retry_time_s: float = 1800.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 3600.0
    max_wait_s: float = 300.0  # a 429 asking for a longer wait (a daily quota) stops the run: exit 6, resumable
    # timeouts
    connect_timeout_s: float = 15.0
    first_byte_timeout_s: float = 180.0  # streaming: until the first chunk
    idle_timeout_s: float = 90.0  # streaming: longest gap between chunks
    attempt_timeout_s: float = 1800.0  # one attempt, whole
    # run
    retry: tuple[str, ...] = ()  # what a rerun sends besides transient failures: truncated, refused, errors, all
    stop_after_failures: int = 20  # the first N rows all failing alike stop the job; 0: never
    event_loop: str = "auto"  # auto (uvloop where it is installed) | uvloop | asyncio; the sync door only
    # where the requests are sent from: this process, or the actors of a Ray cluster (batchkimi.execution.ray)
    engine: str = "local"  # local | ray
    ray_address: str | None = None  # None or "local": start a cluster here; "auto", "host:port", "ray://host:10001"
    ray_actors: int = 0  # 0: one per CPU of the cluster but one
    ray_block_rows: int = 256  # rows per block: what an actor takes at once, and the unit of commit
    grace_s: float = 15.0
    rows_per_part: int = 10000
    flush_interval_s: float = 30.0
    prices: Mapping[str, tuple[float, float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    simulator: Mapping[str, Any] = field(default_factory=dict)
    # an object store's filesystem options (fsspec's: s3fs's endpoint_url, profile, anon, ...); {} = its defaults
    storage: Mapping[str, Any] = field(default_factory=dict)
    # after the requests (see batchkimi.scoring.score): never part of what is sent
    extract: Mapping[str, Any] = field(default_factory=dict)
    score: Mapping[str, Any] = field(default_factory=dict)
    # budget: stop sending once spent + in flight would pass it (0: none)
    max_cost_usd: float = 0.0
    max_total_tokens: int = 0

    def __post_init__(self) -> None:
        # the columns scoring reads (expected answer, groups) are kept in the output
        score = self.score if isinstance(self.score, Mapping) else {}
        groups = score.get("group_by") or []
        needed = [score.get("expected"), score.get("question"), *([groups] if isinstance(groups, str) else groups)]
        extra = [c for c in needed if isinstance(c, str) and c and c not in self.keep_columns]
        if extra:
            object.__setattr__(self, "keep_columns", (*self.keep_columns, *dict.fromkeys(extra)))

    # ---- derived -------------------------------------------------------------------
    @property
    def thinking_on(self) -> bool:
        return self.thinking != "disabled"

    @property
    def streaming(self) -> bool:
        return self.thinking_on if self.stream is None else self.stream

    @property
    def effective_max_tokens(self) -> int | None:
        if self.max_tokens is not None:
            return self.max_tokens
        return THINKING_DEFAULT_MAX_TOKENS if self.thinking_on and self.applies_kimi_rules else None

    @property
    def applies_kimi_rules(self) -> bool:
        return kimi.is_kimi(self.model, self.base_url, self.kimi_rules)

    @property
    def sends_include_usage(self) -> bool:
        """Kimi puts usage in the last chunk unasked; OpenAI-style servers (vLLM, LiteLLM, a
        proxy in front of Kimi) report it in a stream only when asked."""
        return (not self.applies_kimi_rules) if self.include_usage is None else self.include_usage

    @property
    def served_model(self) -> str:
        """The model whose rules and prices apply: ``ep_model`` for a TokenHub endpoint id."""
        return self.ep_model if self.ep_model and self.model.startswith("ep-") else self.model

    @functools.cached_property
    def price_table(self) -> dict[str, tuple[float, float, float]]:
        """``prices``, with the job's ``ep-`` id priced as the model it serves (unless priced itself)."""
        table = dict(self.prices)
        if self.model not in table and self.served_model in table:
            table[self.model] = table[self.served_model]
        return table

    @property
    def uses_simulator(self) -> bool:
        return self.base_url == SIMULATOR

    def replace(self, **changes: Any) -> Job:
        return dataclasses.replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """The resolved job as plain data, for the manifest and --dry-run. Holds no secret."""
        out = dataclasses.asdict(self)
        for key in ("keep_columns", "image_columns", "video_columns", "include", "exclude", "retry"):
            out[key] = list(getattr(self, key))
        out["tools"] = list(self.tools) if self.tools is not None else None
        out["prices"] = {k: list(v) for k, v in self.prices.items()}
        out["storage"] = _hide_secrets(self.storage)
        for key in ("input", "output"):  # a URL's user:password@ or ?signature= is a secret too
            if isinstance(out.get(key), str) and is_url(out[key]):
                out[key] = redact(out[key])
        return out

    def request_settings(self, input_format: str | None = None) -> dict[str, Any]:
        """The resume key: what decides the bytes sent for a row and who answers them. A change
        here makes old results stale, so a resume with a different one is refused. Simulated
        answers never pass for real ones: the endpoint and the simulator's settings that shape
        answers are part of it (its pacing is not). ``input_format``: the format ``auto`` resolved
        to, so that the same job through two doors is the same job."""
        keys = (
            "input_format id_column prompt_column system_column messages_column model ep_model "
            "prompt_template system thinking thinking_keep temperature top_p n "
            "presence_penalty frequency_penalty tools tool_choice response_format stop "
            "extra_body image_columns video_columns media_root media_url_prefix max_image_side samples"
        ).split()
        d = self.public_dict()
        out = {k: d[k] for k in keys}
        out["base_url"] = self.base_url.rstrip("/")
        out["kimi_rules"] = self.applies_kimi_rules
        out["include_usage"] = self.sends_include_usage
        out["simulator"] = ({k: v for k, v in self.simulator.items() if k not in SIMULATOR_PACING}
                            if self.uses_simulator else None)
        if input_format is not None:
            out["input_format"] = input_format
        return out


_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas", "signature")


def _hide_secrets(value: Any) -> Any:
    """``[storage]`` options as plain data with the value of any key that may hold a secret
    (``key``, ``secret``, ``token``, ``password``...) replaced by ``***``."""
    if isinstance(value, Mapping):
        return {k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) else _hide_secrets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_hide_secrets(v) for v in value]
    return value
