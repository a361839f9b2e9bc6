"""What the simulator counts (``GET /stats``): requests, statuses, tokens, connections, bytes
in flight, admissions per second; API keys masked."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any


def new_stats() -> dict[str, Any]:
    """Fresh counters."""
    return {
        "requests": 0, "by_status": Counter(), "by_error": Counter(), "in_flight": 0, "peak_in_flight": 0,
        "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "streams": 0, "chunks": 0,
        "connections": 0, "client_disconnects": 0,
        "body_bytes": 0, "body_bytes_in_flight": 0, "peak_body_bytes_in_flight": 0,
        "images": 0, "videos": 0, "media_urls": 0,
        "admitted": 0, "admitted_first_s": None, "admitted_last_s": None,
        "per_key": defaultdict(lambda: {"requests": 0, "ok": 0, "rate_limited": 0, "tokens": 0}),
        "admitted_per_s": Counter(), "tokens_per_s": Counter(),
    }

def stats_json(s: dict[str, Any], started: float) -> dict[str, Any]:
    """The counters as JSON (``GET /stats``); keys masked."""
    return {
        "requests": s["requests"], "by_status": {str(k): v for k, v in s["by_status"].items()},
        "by_error": dict(s["by_error"]), "in_flight": s["in_flight"], "peak_in_flight": s["peak_in_flight"],
        "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
        "cached_tokens": s["cached_tokens"], "streams": s["streams"], "chunks": s["chunks"],
        "connections": s["connections"], "client_disconnects": s["client_disconnects"],
        "body_bytes": s["body_bytes"], "peak_body_bytes_in_flight": s["peak_body_bytes_in_flight"],
        "images": s["images"], "videos": s["videos"], "media_urls": s["media_urls"],
        "admitted": s["admitted"], "admitted_first_s": s["admitted_first_s"], "admitted_last_s": s["admitted_last_s"],
        "per_key": {mask(k): v for k, v in s["per_key"].items()},
        "admitted_per_s": {str(k): v for k, v in sorted(s["admitted_per_s"].items())},
        "tokens_per_s": {str(k): v for k, v in sorted(s["tokens_per_s"].items())},
        "uptime_s": round(time.monotonic() - started, 3),
    }

def count(stats: dict[str, Any], status: int, key: str | None, etype: str | None = None) -> None:
    """One answer, by status (and error type), and per key."""
    stats["by_status"][status] += 1
    if etype:
        stats["by_error"][etype] += 1
    if key is not None:
        pk = stats["per_key"][key]
        if status == 200:
            pk["ok"] += 1
        elif status == 429:
            pk["rate_limited"] += 1


def mask(key: str) -> str:
    return key[:5] + "..." + key[-4:] if len(key) > 12 else "***"
