"""Kimi's catalogue and rules, in one place: models, roles, context, the body limit, image
types, prices and the cost formula, fixed parameters, and the request rules Kimi enforces with
a 400. Pure: no I/O. Sources are in ``docs/kimi-api.md``.

Example::

    is_kimi("ep-7f3a9", "https://tokenhub-intl.tencentcloudmaas.com/v1", None)   # True
    rule_violation({"temperature": 0.3}, thinking_on=True)
    # -> ("temperature", "invalid temperature: only 1 is allowed for this model")
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

MODELS = ("kimi-k2.6", "kimi-k2.5")
ROLES = frozenset({"system", "user", "assistant", "tool"})  # a message's roles Kimi knows
MAX_BODY_MB = 100.0  # one request body at most
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}  # Pillow's name -> Kimi's type
MIN_IMAGE_SIDE = 14  # a side shorter than one vision tile holds no token
# Request keys a row (an OpenAI Batch line's body) may set; the job sets model and stream itself.
ROW_BODY_KEYS = frozenset({
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "presence_penalty",
    "frequency_penalty", "tools", "tool_choice", "response_format", "stop", "thinking",
    "prompt_cache_key", "safety_identifier", "seed", "user",
})
VIDEO_MODELS = frozenset({"kimi-k2.6"})  # TokenHub: kimi-k2.5 takes no video
CONTEXT_LIMIT_TOKENS = 262144
THINKING_DEFAULT_MAX_TOKENS = 32768
# The guide's floor for a thinking budget: below it, reasoning often uses the whole budget.
THINKING_MIN_MAX_TOKENS = 16000
MAX_STOP_STRINGS = 5
# batchkimi's prompt estimate runs high (about 4 characters a token for English, one token per
# CJK character, where Kimi's tokenizer packs more): a row is refused before sending only when
# three quarters of its estimate plus its max_tokens would still pass the window.
CONTEXT_CHECK_SHARE = 0.75

# USD per 1M tokens: (input cache miss, input cache hit, output). Moonshot's published list
# prices; TokenHub publishes none for Kimi, so a job can override them (``prices``).
DEFAULT_PRICES: dict[str, tuple[float, float, float]] = {
    "kimi-k2.5": (0.60, 0.10, 3.00),
    "kimi-k2.6": (0.95, 0.16, 4.00),
}

# Kimi's fixed sampling parameters: any other value is a 400.
FIXED_PARAMS: dict[str, float] = {"top_p": 0.95, "n": 1, "presence_penalty": 0, "frequency_penalty": 0}

# Hosts that serve only Kimi through a service id: there ``model`` may be ``ep-...``.
KIMI_HOSTS = ("tencentcloudmaas.com",)

# Body keys the job sets itself: ``extra_body`` may not set them behind the job's back.
JOB_OWNED_KEYS = frozenset({"model", "messages", "stream", "stream_options", "thinking", "max_tokens",
                            "max_completion_tokens", "tools", "tool_choice", "response_format", "stop"})


@functools.lru_cache(maxsize=256)  # asked for every row: parse the URL once
def is_kimi(model: str, base_url: str, kimi_rules: bool | None) -> bool:
    """Whether Kimi's rules apply: ``kimi_rules`` if set; else on TokenHub's endpoint (and the
    simulator) every model, a service id ``ep-...`` included; elsewhere a model named ``kimi``."""
    if kimi_rules is not None:
        return kimi_rules
    if base_url == "simulator":
        return True
    host = (urlsplit(base_url).hostname or "").lower()
    if any(host == h or host.endswith("." + h) for h in KIMI_HOSTS):
        return True
    return "kimi" in model.lower()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def rule_violation(params: Mapping[str, Any], thinking_on: bool) -> tuple[str, str] | None:
    """The first request parameter Kimi would refuse, as (key, Kimi's own 400 message), else None.

    Used for the job's settings (``extra_body`` included) and for each OpenAI batch line's
    body, so both say the same thing.
    """
    temperature = params.get("temperature")
    if temperature is not None:
        allowed = 1.0 if thinking_on else 0.6
        if _number(temperature) != allowed:
            return "temperature", f"invalid temperature: only {allowed:g} is allowed for this model"
    for key, fixed in FIXED_PARAMS.items():
        value = params.get(key)
        if value is not None and _number(value) != fixed:
            return key, f"invalid {key}: only {fixed:g} is allowed for this model"
    choice = params.get("tool_choice")
    if thinking_on and choice == "required":
        return "tool_choice", "tool_choice 'required' is incompatible with thinking enabled"
    if thinking_on and isinstance(choice, dict):
        return "tool_choice", "tool_choice 'specified' is incompatible with thinking enabled"
    stop = params.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        return "stop", f"stop has {len(stop)} strings; Kimi takes at most {MAX_STOP_STRINGS}"
    return None


def missing_reasoning(message: Mapping[str, Any], thinking_on: bool) -> bool:
    """An assistant tool-call turn without ``reasoning_content``: with thinking on, Kimi refuses
    the whole request ('thinking is enabled but reasoning_content is missing in assistant tool
    call message at index N'). An empty string is accepted."""
    return thinking_on and message.get("role") == "assistant" and bool(message.get("tool_calls")) \
        and "reasoning_content" not in message


def takes_video(model: str) -> bool:
    return model in VIDEO_MODELS


def context_overflow(prompt_tokens_estimate: int, max_tokens: int | None) -> str | None:
    """Why a request can never fit Kimi's context window (prompt plus the completion budget),
    or None. Kimi itself answers such a request with a 400 ('Your request exceeded model token
    limit'); refusing it here spares the upload, the wait and the rerun."""
    low = int(prompt_tokens_estimate * CONTEXT_CHECK_SHARE)
    if low > CONTEXT_LIMIT_TOKENS:
        return (f"the prompt is about {prompt_tokens_estimate:,} tokens (estimated), over Kimi's context window "
                f"of {CONTEXT_LIMIT_TOKENS:,}: shorten it or split the row")
    if max_tokens is not None and low + max_tokens > CONTEXT_LIMIT_TOKENS:
        return (f"the prompt (about {prompt_tokens_estimate:,} tokens, estimated) plus max_tokens ({max_tokens:,}) "
                f"cannot fit Kimi's context window of {CONTEXT_LIMIT_TOKENS:,}: lower max_tokens or shorten the prompt")
    return None


def thinking_budget_note(max_tokens: int | None, thinking_on: bool, source: str) -> str | None:
    """A warning for a thinking budget under the guide's floor (reasoning and answer share it)."""
    if not thinking_on or max_tokens is None or max_tokens >= THINKING_MIN_MAX_TOKENS:
        return None
    return (f"{source} sets max_tokens = {max_tokens:,} with thinking on: Kimi's guide asks for at least "
            f"{THINKING_MIN_MAX_TOKENS:,} (32,768 recommended), since reasoning and answer share it; "
            "expect truncated rows (finish_reason 'length', often with an empty answer)")


def cost_usd(prices: Any, model: str | None, prompt: int | None, completion: int | None, cached: int | None) -> float | None:
    """(prompt - cached)·miss + cached·hit + completion·out, in USD; None for an unknown model."""
    triple = prices.get(model or "")
    if triple is None or prompt is None:
        return None
    miss, hit, out = triple
    cached = cached or 0
    return ((prompt - cached) * miss + cached * hit + (completion or 0) * out) / 1e6


# ---- Kimi's answer shape, as assumed ------------------------------------------------------------
# Kimi publishes neither its length distribution nor its speed. These are estimates from public
# reports of K2-class models (the README says so): the reasoning and the answer's token counts as
# lognormals (median, sigma of the log), by thinking mode; time to first token; decode rate.
# The simulator answers with this shape, and the dry run's cost range assumes it.
ASSUMED_LENGTHS: dict[str, dict[str, float]] = {
    "thinking": {"reasoning_median": 1800.0, "reasoning_sigma": 1.2, "answer_median": 300.0, "answer_sigma": 0.8},
    "non-thinking": {"reasoning_median": 0.0, "reasoning_sigma": 0.0, "answer_median": 350.0, "answer_sigma": 0.9},
}
ASSUMED_TTFT_MS = 1500.0
ASSUMED_TOKENS_PER_S = 60.0


def completion_range(rows: int, max_tokens: int | None, thinking: bool, shape: Mapping[str, float] | None = None,
                     coverage: float = 0.9, seed: int = 0) -> tuple[int, int]:
    """The range holding the total completion tokens of ``rows`` answers with probability
    ``coverage``, if they have Kimi's assumed shape (``shape``: another one) and are cut at
    ``max_tokens``: simulated for a few thousand rows, by the normal approximation of the sum
    beyond (its mean and spread from 200,000 simulated answers)."""
    import numpy as np

    if rows <= 0:
        return 0, 0
    s = dict(shape or ASSUMED_LENGTHS["thinking" if thinking else "non-thinking"])
    rng = np.random.default_rng(seed)
    cap = max_tokens or THINKING_DEFAULT_MAX_TOKENS

    def answers(n: int) -> Any:
        total = np.zeros(n)
        if thinking and s["reasoning_median"] > 0:
            total += s["reasoning_median"] * np.exp(s["reasoning_sigma"] * rng.standard_normal(n))
        if s["answer_median"] > 0:
            total += s["answer_median"] * np.exp(s["answer_sigma"] * rng.standard_normal(n))
        return np.minimum(np.rint(total), cap)

    tail = (1 - coverage) / 2
    if rows <= 4000:
        draws = 2000 if rows <= 500 else 400
        sums = np.array([answers(rows).sum() for _ in range(draws)])
        low, high = np.quantile(sums, [tail, 1 - tail])
    else:
        one = answers(200_000)
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - tail)
        mean, spread = rows * one.mean(), (rows ** 0.5) * one.std()
        low, high = mean - z * spread, mean + z * spread
    return int(max(0, low)), int(high)
