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
from .errors import _meta, error_from_payload, snippet
from .sse import SSEDecoder


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


class _Bad(Exception):
    """A field of the reply has the wrong type; becomes a ``bad_response`` :class:`ResponseError`."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        shown = snippet(orjson.dumps(value, default=str), 60) if value is not None else "null"
        super().__init__(f"the reply's {field} is {json_type(value)} {shown}, expected {expected}")


def _bad_response(message: str) -> ResponseError:
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


def _text(value: Any, field: str) -> str | None:
    """Message text: a string, or an array of text parts (some servers send that)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        out = []
        for i, p in enumerate(value):
            t = p.get("text", "")
            if not isinstance(t, str):
                raise _Bad(f"{field}[{i}].text", t, "a string")
            out.append(t)
        return "".join(out)
    raise _Bad(field, value, "a string")


def _finish_reason(value: Any, field: str, warn: list[str]) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    warn.append(f"{field} was {_shown(value)}, not a string: dropped")
    return None


def _reasoning(value: Any, field: str, warn: list[str]) -> str | None:
    """Reasoning text; reasoning of another type is dropped with a warning (the answer stays)."""
    try:
        return _text(value, field)
    except _Bad:
        warn.append(f"{field} was {_shown(value)}, not text: dropped")
        return None


def _arguments(value: Any, field: str) -> str:
    """Tool-call arguments are JSON text; an object (some servers send one) is written as JSON text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    raise _Bad(field, value, "a JSON string")


def _tool_calls(value: Any, field: str) -> list[dict[str, Any]] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise _Bad(field, value, "an array")
    calls = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise _Bad(where, call, "an object")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _Bad(f"{where}.function", fn, "an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _Bad(f"{where}.function.name", name, "a non-empty string")
        cid = call.get("id")
        if cid is not None and not isinstance(cid, str):
            raise _Bad(f"{where}.id", cid, "a string")
        ctype = call.get("type") or "function"
        calls.append({"id": cid, "type": ctype if isinstance(ctype, str) else "function",
                      "function": {"name": name, "arguments": _arguments(fn.get("arguments"), f"{where}.function.arguments")}})
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
        raise _bad_response(f"the 200 response is {json_type(data)}, not a JSON object")
    if "error" in data and data["error"]:
        raise error_from_payload(data, http_status=200)
    try:
        return _completion(data)
    except _Bad as exc:
        raise _bad_response(str(exc)) from None


def _completion(data: dict[str, Any]) -> Answer:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _Bad("choices", choices, "a non-empty array")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise _Bad("choices[0]", choice, "an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _Bad("choices[0].message", message, "an object")
    warn: list[str] = []
    usage = (parse_usage(data.get("usage"), "usage", warn)
             or parse_usage(choice.get("usage"), "choices[0].usage", warn) or Usage())
    reasoning = message.get("reasoning_content")
    field = "choices[0].message.reasoning_content"
    if reasoning is None and "reasoning" in message:
        reasoning, field = message.get("reasoning"), "choices[0].message.reasoning"
    answer = Answer(
        content=_text(message.get("content"), "choices[0].message.content") or "",
        reasoning_content=_reasoning(reasoning, field, warn),
        tool_calls=_tool_calls(message.get("tool_calls"), "choices[0].message.tool_calls"),
        finish_reason=_finish_reason(choice.get("finish_reason"), "choices[0].finish_reason", warn),
        usage=usage,
        model=model if type(model := data.get("model")) is str else _meta(model),
        response_id=rid if type(rid := data.get("id")) is str else _meta(rid),
        warnings=tuple(warn),
    )
    _require_something(answer)
    return answer


def _require_something(answer: Answer) -> None:
    """A reply with no text, no reasoning and no tool call is no answer, whatever its status."""
    if not answer.content and not answer.reasoning_content and not answer.tool_calls:
        raise ResponseError("the reply holds no text, no reasoning and no tool call: no answer came",
                            error_type="empty_answer", retryable=True)


_SSE_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:")


def looks_like_sse(body: bytes) -> bool:
    """A body that begins like Server-Sent Events (a JSON body never does)."""
    return body.lstrip(b"\xef\xbb\xbf \t\r\n")[:6].startswith(_SSE_STARTS)


def parse_sse_body(body: bytes) -> Answer:
    """A whole SSE stream that arrived as one body (mislabelled by a proxy, or unpaced)."""
    decoder, asm = SSEDecoder(), StreamAssembler()
    for data in decoder.feed(body) + decoder.close():
        if asm.add(data):
            break
    return asm.finish()


class StreamAssembler:
    """Accumulates SSE data payloads into an :class:`Answer`.

    Call :meth:`add` with each event's data; it returns True once ``[DONE]`` arrived.
    :meth:`finish` returns the answer, or raises if the stream ended without ``[DONE]``.
    A chunk with a field of the wrong type raises a ``bad_response`` :class:`ResponseError`
    naming it (the attempt is retried like a cut stream).
    """

    __slots__ = ("content", "reasoning", "tools", "finish_reason", "usage", "model", "response_id", "done", "chunks",
                 "warnings")

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
        self.warnings: list[str] = []

    def add(self, data: bytes | str) -> bool:
        if self.done:
            return True
        if type(data) is str:
            data = data.encode()
        try:
            chunk = orjson.loads(data)  # parsed first: [DONE] and blank data are once a stream
        except orjson.JSONDecodeError:
            stripped = data.strip()
            if stripped == b"[DONE]":
                self.done = True
                return True
            if not stripped:
                return False
            # Some servers forget the blank line between events: "data: {..}\ndata: {..}".
            parts = data.split(b"\n")
            if len(parts) > 1:
                return any([self.add(p) for p in parts])
            raise ResponseError(
                f"a stream event is not JSON: {snippet(data)}", error_type="bad_stream", retryable=True
            ) from None
        if type(chunk) is not dict:
            return False
        if chunk.get("error"):
            raise error_from_payload(chunk, http_status=200, in_stream=True)
        try:
            self._chunk(chunk)
        except _Bad as exc:
            raise _bad_response(f"{exc} (stream chunk {self.chunks})") from None
        return False

    def _chunk(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        model = chunk.get("model")
        if model:
            self.model = model if type(model) is str else (_meta(model) or self.model)
        if self.response_id is None:
            rid = chunk.get("id")
            self.response_id = rid if type(rid) is str else _meta(rid)
        usage = chunk.get("usage")
        if usage is not None:
            self.usage = parse_usage(usage, "usage", self.warnings) or self.usage
        choices = chunk.get("choices")
        if not choices:
            return
        if not isinstance(choices, list):
            raise _Bad("choices", choices, "an array")
        choice = choices[0]
        if not isinstance(choice, dict):
            raise _Bad("choices[0]", choice, "an object")
        usage = choice.get("usage")
        if usage is not None:
            self.usage = parse_usage(usage, "choices[0].usage", self.warnings) or self.usage
        finish = choice.get("finish_reason")
        if finish is not None:
            self.finish_reason = _finish_reason(finish, "choices[0].finish_reason", self.warnings) or self.finish_reason
        delta = choice.get("delta")
        if delta is None:
            delta = choice.get("message")
            if delta is None:
                return
        if not isinstance(delta, dict):
            raise _Bad("choices[0].delta", delta, "an object")
        text = delta.get("content")
        if text is not None:
            if type(text) is not str:
                text = _text(text, "choices[0].delta.content")
            if text:
                self.content.append(text)
        reasoning = delta.get("reasoning_content")
        if reasoning is None:
            reasoning = delta.get("reasoning")
        if reasoning is not None:
            if type(reasoning) is not str:
                reasoning = _reasoning(reasoning, f"choices[0].delta.reasoning_content (chunk {self.chunks})", self.warnings)
            if reasoning:
                self.reasoning.append(reasoning)
        calls = delta.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise _Bad("choices[0].delta.tool_calls", calls, "an array")
            for i, call in enumerate(calls):
                self._add_tool_delta(call, f"choices[0].delta.tool_calls[{i}]")

    def _add_tool_delta(self, call: Any, where: str) -> None:
        if not isinstance(call, dict):
            raise _Bad(where, call, "an object")
        index = call.get("index")
        if type(index) is not int:
            index = len(self.tools) if call.get("id") else max(self.tools, default=0)
        slot = self.tools.get(index)
        if slot is None:
            slot = self.tools[index] = {"id": None, "type": "function", "name": None, "arguments": []}
        cid = call.get("id")
        if cid is not None:
            if not isinstance(cid, str):
                raise _Bad(f"{where}.id", cid, "a string")
            if not slot["id"]:
                slot["id"] = cid  # keep the first id: some proxies change it mid-stream
        ctype = call.get("type")
        if ctype and isinstance(ctype, str):
            slot["type"] = ctype
        fn = call.get("function")
        if fn is None:
            return
        if not isinstance(fn, dict):
            raise _Bad(f"{where}.function", fn, "an object")
        name = fn.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise _Bad(f"{where}.function.name", name, "a string")
            if not slot["name"]:
                slot["name"] = name
        args = fn.get("arguments")
        if isinstance(args, dict):
            # An object is the whole arguments (a proxy that re-sends them with every delta),
            # never a fragment: the last one stands, as in a non-streaming answer.
            slot["arguments"] = [_arguments(args, f"{where}.function.arguments")]
        elif args is not None:
            slot["arguments"].append(_arguments(args, f"{where}.function.arguments"))

    def finish(self, ttft_s: float | None = None) -> Answer:
        if not self.done:
            raise ResponseError(
                f"the stream ended after {self.chunks} chunks without data: [DONE]",
                error_type="stream_cut",
                retryable=True,
            )
        if not self.chunks:
            raise ResponseError("the stream sent data: [DONE] and nothing before it: no answer came",
                                error_type="bad_stream", retryable=True)
        tool_calls = None
        if self.tools:
            tool_calls = []
            for index, slot in sorted(self.tools.items()):
                if not slot["name"]:
                    raise _bad_response(f"the stream's tool call {index} has no function.name")
                tool_calls.append({"id": slot["id"], "type": slot["type"],
                                   "function": {"name": slot["name"], "arguments": "".join(slot["arguments"])}})
        answer = Answer(
            content="".join(self.content),
            reasoning_content="".join(self.reasoning) if self.reasoning else None,
            tool_calls=tool_calls,
            finish_reason=self.finish_reason,
            usage=self.usage or Usage(),
            model=self.model,
            response_id=self.response_id,
            ttft_s=ttft_s,
            warnings=tuple(dict.fromkeys(self.warnings)),
        )
        _require_something(answer)
        return answer
