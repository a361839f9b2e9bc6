"""Turn what the server said into an :class:`Answer` or an :class:`~batchkimi.errors.APIError`.

Pure: no I/O. Handles both response shapes (one JSON body, or an SSE stream of chunks),
both error envelopes (TokenHub's ``type/code/message/source/upstream_*/request_id`` and
Moonshot's ``type/message``), and bodies that are not JSON at all (a gateway's HTML page).

Any reply is input, and what a field is decides what a wrong type costs:

- **the answer** (``content``, tool calls): unusable text makes a ``bad_response``
  :class:`ResponseError` naming the field (retried at most once: a malformed 200 is almost
  always deterministic); a reply with no text, no reasoning and no tool call is no answer
  (``empty_answer``);
- **accounting and annotations** (``usage`` and its counts, ``finish_reason``,
  ``reasoning_content``): a paid answer is never thrown away for them. What can be coerced is
  (``"12"`` tokens is 12), what cannot is dropped (null), and each oddity is a line of the
  answer's ``warnings``;
- **metadata** (``id``, ``model``) of the wrong type is kept as text or ignored.

Usage sits in ``usage`` or ``choices[0].usage`` (Kimi streams put it in the latter; the last
non-null one wins); cached tokens in ``usage.cached_tokens`` or
``usage.prompt_tokens_details.cached_tokens``. Tool calls in a stream are assembled by
``index``, keeping the first non-empty ``id``. A stream is complete only at ``[DONE]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import ResponseError, json_type
from .errors import error_from_payload, meta, snippet


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
    warnings: tuple[str, ...] = ()  # what was odd in a reply that was kept (see the module docstring)


class FieldError(Exception):
    """A field of the reply has the wrong type; becomes a ``bad_response`` :class:`ResponseError`."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        shown = snippet(orjson.dumps(value, default=str), 60) if value is not None else "null"
        super().__init__(f"the reply's {field} is {json_type(value)} {shown}, expected {expected}")


def bad_response(message: str) -> ResponseError:
    return ResponseError(message, error_type="bad_response", retryable=True)


def _shown(value: Any) -> str:
    return f"{json_type(value)} {snippet(orjson.dumps(value, default=str), 60)}" if value is not None else "null"


def _num(v: Any, field: str, name: str, warn: list[str]) -> int | None:
    """A token count: a whole number; a number written as text is read (with a warning);
    anything else is dropped (with a warning)."""
    if v is None or type(v) is int:
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        warn.append(f"{field}.{name} was the text {v!r}, read as {int(v)}")
        return int(v)
    warn.append(f"{field}.{name} was {_shown(v)}, not a whole number: dropped")
    return None


def parse_usage(raw: Any, field: str = "usage", warn: list[str] | None = None) -> Usage | None:
    """Usage from either spelling of cached tokens; odd values are coerced or dropped, each
    with a line in ``warn``."""
    if warn is None:
        warn = []
    if raw is None:
        return None
    if not isinstance(raw, dict):
        warn.append(f"{field} was {_shown(raw)}, not an object: dropped")
        return None
    get = raw.get
    cached = get("cached_tokens")
    where = field
    if cached is None:
        details = get("prompt_tokens_details")
        if isinstance(details, dict):
            cached, where = details.get("cached_tokens"), f"{field}.prompt_tokens_details"
    prompt = _num(get("prompt_tokens"), field, "prompt_tokens", warn)
    completion = _num(get("completion_tokens"), field, "completion_tokens", warn)
    total = _num(get("total_tokens"), field, "total_tokens", warn)
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return Usage(prompt, completion, total, _num(cached, where, "cached_tokens", warn))


def text_field(value: Any, field: str) -> str | None:
    """Message text: a string, or an array of text parts (some servers send that)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        out = []
        for i, p in enumerate(value):
            t = p.get("text", "")
            if not isinstance(t, str):
                raise FieldError(f"{field}[{i}].text", t, "a string")
            out.append(t)
        return "".join(out)
    raise FieldError(field, value, "a string")


def finish_reason_field(value: Any, field: str, warn: list[str]) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    warn.append(f"{field} was {_shown(value)}, not a string: dropped")
    return None


def reasoning_field(value: Any, field: str, warn: list[str]) -> str | None:
    """Reasoning text; reasoning of another type is dropped with a warning (the answer stays)."""
    try:
        return text_field(value, field)
    except FieldError:
        warn.append(f"{field} was {_shown(value)}, not text: dropped")
        return None


def arguments_field(value: Any, field: str) -> str:
    """Tool-call arguments are JSON text; an object (some servers send one) is written as JSON text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    raise FieldError(field, value, "a JSON string")


def tool_calls_field(value: Any, field: str) -> list[dict[str, Any]] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise FieldError(field, value, "an array")
    calls = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise FieldError(where, call, "an object")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise FieldError(f"{where}.function", fn, "an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise FieldError(f"{where}.function.name", name, "a non-empty string")
        cid = call.get("id")
        if cid is not None and not isinstance(cid, str):
            raise FieldError(f"{where}.id", cid, "a string")
        ctype = call.get("type") or "function"
        calls.append({"id": cid, "type": ctype if isinstance(ctype, str) else "function",
                      "function": {"name": name, "arguments": arguments_field(fn.get("arguments"), f"{where}.function.arguments")}})
    return calls


def parse_completion(body: bytes) -> Answer:
    """Parse a non-streaming 200 body. Raises :class:`ResponseError` for anything less than an
    answer, naming the field that is missing or of the wrong type."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ResponseError(
            f"the 200 response is not JSON: {snippet(body)}", error_type="bad_response", retryable=True
        ) from None
    if not isinstance(data, dict):
        raise bad_response(f"the 200 response is {json_type(data)}, not a JSON object")
    if "error" in data and data["error"]:
        raise error_from_payload(data, http_status=200)
    try:
        return _completion(data)
    except FieldError as exc:
        raise bad_response(str(exc)) from None


def _completion(data: dict[str, Any]) -> Answer:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise FieldError("choices", choices, "a non-empty array")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise FieldError("choices[0]", choice, "an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise FieldError("choices[0].message", message, "an object")
    warn: list[str] = []
    usage = (parse_usage(data.get("usage"), "usage", warn)
             or parse_usage(choice.get("usage"), "choices[0].usage", warn) or Usage())
    reasoning = message.get("reasoning_content")
    field = "choices[0].message.reasoning_content"
    if reasoning is None and "reasoning" in message:
        reasoning, field = message.get("reasoning"), "choices[0].message.reasoning"
    answer = Answer(
        content=text_field(message.get("content"), "choices[0].message.content") or "",
        reasoning_content=reasoning_field(reasoning, field, warn),
        tool_calls=tool_calls_field(message.get("tool_calls"), "choices[0].message.tool_calls"),
        finish_reason=finish_reason_field(choice.get("finish_reason"), "choices[0].finish_reason", warn),
        usage=usage,
        model=model if type(model := data.get("model")) is str else meta(model),
        response_id=rid if type(rid := data.get("id")) is str else meta(rid),
        warnings=tuple(warn),
    )
    require_something(answer)
    return answer


def require_something(answer: Answer) -> None:
    """A reply with no text, no reasoning and no tool call is no answer, whatever its status."""
    if not answer.content and not answer.reasoning_content and not answer.tool_calls:
        raise ResponseError("the reply holds no text, no reasoning and no tool call: no answer came",
                            error_type="empty_answer", retryable=True)
