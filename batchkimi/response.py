"""Turn what the server said into an :class:`Answer` or an :class:`~batchkimi.errors.APIError`.

Pure: no I/O. Handles both response shapes (one JSON body, or an SSE stream of chunks),
both error envelopes (TokenHub's ``type/code/message/source/upstream_*/request_id`` and
Moonshot's ``type/message``), and bodies that are not JSON at all (a gateway's HTML page).

Usage sits in ``usage`` or ``choices[0].usage`` (Kimi streams put it in the latter; the last
non-null one wins); cached tokens in ``usage.cached_tokens`` or
``usage.prompt_tokens_details.cached_tokens``. Tool calls in a stream are assembled by
``index``, keeping the first non-empty ``id``. A stream is complete only at ``[DONE]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import APIError, HTTPStatusError, ResponseError


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """One complete answer."""

    content: str
    reasoning_content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str | None
    usage: Usage
    model: str | None
    response_id: str | None
    ttft_s: float | None = None


def _num(v: Any) -> int | None:
    if type(v) is int:
        return v
    return int(v) if isinstance(v, float) else None


def parse_usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    cached = raw.get("cached_tokens")
    details = raw.get("prompt_tokens_details")
    if cached is None and isinstance(details, dict):
        cached = details.get("cached_tokens")

    prompt, completion, total = _num(raw.get("prompt_tokens")), _num(raw.get("completion_tokens")), _num(raw.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return Usage(prompt, completion, total, _num(cached))


def _text(value: Any) -> str | None:
    """Message content as text: a string, or an array of text parts (some servers send that)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict))
    return str(value)


def parse_completion(body: bytes) -> Answer:
    """Parse a non-streaming 200 body. Raises :class:`ResponseError` for anything less than an answer."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ResponseError(
            f"the 200 response is not JSON: {snippet(body)}", error_type="bad_response", retryable=True
        ) from None
    if not isinstance(data, dict):
        raise ResponseError("the 200 response is not a JSON object", error_type="bad_response", retryable=True)
    if "error" in data and data["error"]:
        raise error_from_payload(data, http_status=200)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ResponseError("the 200 response has no choices", error_type="bad_response", retryable=True)
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ResponseError("the 200 response has no choices[0].message", error_type="bad_response", retryable=True)
    usage = parse_usage(data.get("usage")) or parse_usage(choice.get("usage")) or Usage()
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = message.get("reasoning")
    tool_calls = message.get("tool_calls") or None
    return Answer(
        content=_text(message.get("content")) or "",
        reasoning_content=_text(reasoning),
        tool_calls=tool_calls if isinstance(tool_calls, list) else None,
        finish_reason=choice.get("finish_reason"),
        usage=usage,
        model=data.get("model"),
        response_id=data.get("id"),
    )


class StreamAssembler:
    """Accumulates SSE data payloads into an :class:`Answer`.

    Call :meth:`add` with each event's data; it returns True once ``[DONE]`` arrived.
    :meth:`finish` returns the answer, or raises if the stream ended without ``[DONE]``.
    """

    __slots__ = ("content", "reasoning", "tools", "finish_reason", "usage", "model", "response_id", "done", "chunks")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.done = False
        self.chunks = 0

    def add(self, data: bytes | str) -> bool:
        if self.done:
            return True
        if isinstance(data, str):
            data = data.encode()
        if data[:1] != b"{":
            stripped = data.strip()
            if stripped == b"[DONE]":
                self.done = True
                return True
            if not stripped:
                return False
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            # Some servers forget the blank line between events: "data: {..}\ndata: {..}".
            parts = data.split(b"\n")
            if len(parts) > 1:
                return any([self.add(p) for p in parts])
            raise ResponseError(
                f"a stream event is not JSON: {snippet(data)}", error_type="bad_stream", retryable=True
            ) from None
        if not isinstance(chunk, dict):
            return False
        if chunk.get("error"):
            raise error_from_payload(chunk, http_status=200, in_stream=True)
        self.chunks += 1
        self.model = chunk.get("model") or self.model
        self.response_id = self.response_id or chunk.get("id")
        usage = parse_usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return False
        choice = choices[0]
        if not isinstance(choice, dict):
            return False
        usage = parse_usage(choice.get("usage"))
        if usage is not None:
            self.usage = usage
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice.get("message") if isinstance(choice.get("message"), dict) else None
            if delta is None:
                return False
        text = delta.get("content")
        if text:
            self.content.append(text if isinstance(text, str) else (_text(text) or ""))
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            self.reasoning.append(reasoning)
        calls = delta.get("tool_calls")
        if calls:
            for call in calls:
                self._add_tool_delta(call)
        return False

    def _add_tool_delta(self, call: Any) -> None:
        if not isinstance(call, dict):
            return
        index = call.get("index")
        if not isinstance(index, int):
            index = len(self.tools) if call.get("id") else max(self.tools, default=0)
        slot = self.tools.get(index)
        if slot is None:
            slot = self.tools[index] = {"id": None, "type": "function", "name": None, "arguments": []}
        if call.get("id") and not slot["id"]:
            slot["id"] = call["id"]  # keep the first id: some proxies change it mid-stream
        if call.get("type"):
            slot["type"] = call["type"]
        fn = call.get("function") or {}
        if fn.get("name") and not slot["name"]:
            slot["name"] = fn["name"]
        if fn.get("arguments"):
            slot["arguments"].append(fn["arguments"])

    def finish(self, ttft_s: float | None = None) -> Answer:
        if not self.done:
            raise ResponseError(
                f"the stream ended after {self.chunks} chunks without data: [DONE]",
                error_type="stream_cut",
                retryable=True,
            )
        tool_calls = None
        if self.tools:
            tool_calls = [
                {
                    "id": slot["id"],
                    "type": slot["type"],
                    "function": {"name": slot["name"], "arguments": "".join(slot["arguments"])},
                }
                for _, slot in sorted(self.tools.items())
            ]
        return Answer(
            content="".join(self.content),
            reasoning_content="".join(self.reasoning) if self.reasoning else None,
            tool_calls=tool_calls,
            finish_reason=self.finish_reason,
            usage=self.usage or Usage(),
            model=self.model,
            response_id=self.response_id,
            ttft_s=ttft_s,
        )


# ---- errors ---------------------------------------------------------------------------

_TRY_AGAIN = re.compile(r"try again (?:after|in) (\d+(?:\.\d+)?) ?s", re.IGNORECASE)
_QUOTA_WORDS = ("quota", "balance", "suspended", "billing", "insufficient", "exhausted", "inactive")


def snippet(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", errors="replace")
    text = re.sub(r"<[^>]+>", " ", text)  # an HTML gateway page: keep its words
    text = " ".join(text.split())
    return text + ("..." if len(body) > limit else "")


def retry_hint_from_message(message: str) -> float | None:
    """Moonshot's "... please try again after 3 seconds" as 3.0."""
    m = _TRY_AGAIN.search(message)
    return float(m.group(1)) if m else None


def error_from_payload(data: dict[str, Any], *, http_status: int, in_stream: bool = False) -> APIError:
    err = data.get("error")
    if not isinstance(err, dict):
        err = {"message": str(err)}
    etype = str(err.get("type") or err.get("upstream_code") or err.get("code") or "api_error")
    code = err.get("code")
    message = str(err.get("message") or etype)
    request_id = err.get("request_id") or data.get("request_id")
    status = http_status
    if in_stream:
        # An error event inside a 200 stream: the answer is incomplete. Retry unless it says why not.
        inner = err.get("upstream_status") or err.get("status")
        status = int(inner) if isinstance(inner, int | str) and str(inner).isdigit() else 500
    retryable, fatal = classify(status if status != 200 else 500, etype, message, code)
    cls, text = (ResponseError, f"error event in the stream: {message}") if in_stream else (HTTPStatusError, message)
    return cls(
        text,
        error_type=etype,
        http_status=http_status,
        code=None if code is None else str(code),
        request_id=request_id,
        retryable=retryable,
        fatal=fatal,
        retry_after_s=retry_hint_from_message(message),
    )


def error_from_response(status: int, body: bytes, content_type: str = "") -> APIError:
    """A non-2xx response as an :class:`APIError` (either envelope, or no JSON at all)."""
    data: Any = None
    if body[:1] in (b"{", b"[") or "json" in content_type:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
    if isinstance(data, dict) and "error" in data:
        return error_from_payload(data, http_status=status)
    if isinstance(data, dict) and ("message" in data or "type" in data):
        return error_from_payload({"error": data}, http_status=status)
    etype = {413: "request_too_large"}.get(status, "http_error")
    retryable, fatal = classify(status, etype, "", None)
    text = snippet(body) or "(empty body)"
    return HTTPStatusError(
        f"HTTP {status} with a non-JSON body: {text}",
        error_type=etype,
        http_status=status,
        retryable=retryable,
        fatal=fatal,
    )


def classify(status: int, error_type: str, message: str, code: Any) -> tuple[bool, bool]:
    """(retryable, fatal) for an error, per tokenhub-api.md §6.4.

    Retried: 408, 409, 429 rate limits and overload, 5xx. Not retried: other 4xx.
    Fatal (stop the job, every row would fail alike): 401, 402, 403, quota or balance errors
    whatever their status (Moonshot sends insufficient balance as a 429), and a wrong model
    or base URL (404, or TokenHub's 400 "invalid parameter 'model'").
    """
    lowered = f"{error_type} {message} {code}".lower()
    quota = "exceeded_current_quota" in lowered or "free_quota_exhausted" in lowered or (
        status in (402, 403, 429) and any(w in lowered for w in _QUOTA_WORDS) and "rate limit" not in lowered
    )
    # A wrong base_url or model fails every row alike: 404 (unless about one row's file), or
    # TokenHub's 400 "invalid parameter 'model'".
    wrong_target = (status == 404 and "file" not in lowered) or (status == 400 and "parameter 'model'" in lowered)
    if status in (401, 402, 403) or quota or wrong_target:
        return False, True
    if status in (408, 409, 425, 429) or status >= 500:
        return True, False
    return False, False
