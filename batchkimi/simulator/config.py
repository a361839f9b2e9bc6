"""Every simulator setting (:class:`SimConfig`: a job's ``[simulator]`` table and the
``batchkimi simulate`` flags) and the faults a prompt marker can ask for."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from typing import Any

MARKER = re.compile(r"\[\[sim:([a-z0-9_]+)(?:\*(\d+))?\]\]")
FAULTS = ("500", "502", "503", "504", "html", "429", "overload", "400", "401", "402", "403", "451",
          "quota", "suspended", "content_filter", "tpd", "too_long",
          "cut", "nodone", "stall", "slow", "error_event", "length", "bad_args", "long", "parallel_tools")
ERROR_FAULTS = frozenset({"500", "502", "503", "504", "html", "429", "overload", "400", "401", "402", "403", "451",
                           "quota", "suspended", "content_filter", "tpd", "too_long"})

@dataclass
class SimConfig:
    """Every simulator setting; the job's ``[simulator]`` table and ``batchkimi simulate`` flags."""

    host: str = "127.0.0.1"
    port: int = 0
    tls: bool = False  # serve HTTPS with a certificate from a fresh test CA (trustme)
    api_keys: tuple[str, ...] | None = None  # None: any non-empty key
    key_models: dict[str, list[str]] = field(default_factory=dict)  # key -> allowed models (403 else)
    seed: int = 0
    error_style: str = "tokenhub"  # tokenhub | moonshot
    unknown_model_status: int = 404  # 404 (Moonshot) or 400 (TokenHub)
    endpoints: dict[str, str] = field(default_factory=dict)  # TokenHub endpoint id (ep-...) -> the model it serves
    latency_ms: float = 0.0  # non-streaming: time to the answer; streaming: time to first chunk
    # A modelled network between client and simulator (loopback has none): each request waits one
    # round trip more, and a connection's first request the handshakes' too (TCP's, and TLS 1.3's
    # with tls): a client that does not reuse connections pays them on every request, as it would
    # over the internet.
    rtt_ms: float = 0.0
    tokens_per_s: float = 0.0  # streaming pace; 0 = as fast as possible
    chunk_tokens: int = 4
    reasoning_words: int = 40
    answer_words: int = 30
    accuracy: float = 0.9
    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    window_s: float = 60.0  # the span rpm and tpm are counted over
    retry_after: str = "seconds"  # seconds | date | none
    rate_limit_style: str = "tokenhub"  # tokenhub | moonshot ("please try again after N seconds")
    fail_rate: float = 0.0
    fail_faults: tuple[str, ...] = ("500", "502", "503", "504", "overload", "cut")
    overload_rate: float = 0.0
    bad_tool_args_rate: float = 0.0
    stall_s: float = 3600.0
    slow_first_byte_s: float = 30.0
    long_line_bytes: int = 200_000
    max_body_bytes: int = 100 * 1024 * 1024
    body_too_large_status: int = 413
    cache_prefixes: bool = True
    tpd_retry_after_s: float = 1152.0  # the Retry-After Moonshot sent with a real TPD 429
    estimate_endpoint: bool = True  # POST /v1/tokenizers/estimate-token-count (Moonshot's)
    models_endpoint: bool = True  # GET /v1/models

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> SimConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hint = difflib.get_close_matches(unknown[0], known, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(sorted(known))})"
            raise ValueError(f"unknown simulator setting '{unknown[0]}'{extra}")
        values = dict(values)
        for key in ("api_keys", "fail_faults"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        bad = set(values.get("fail_faults", ())) - set(FAULTS)
        if bad:
            raise ValueError(f"unknown simulator faults: {', '.join(sorted(bad))}")
        return cls(**values)


