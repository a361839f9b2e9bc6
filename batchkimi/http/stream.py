"""A streamed answer assembled from its SSE events: :class:`StreamAssembler` (and a whole stream
that arrived as one body). The fields are read as :mod:`.response` reads them: the same answer
streamed or not. Pure."""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import ResponseError
from .errors import error_from_payload, meta, snippet
from .response import (
    Answer,
    FieldError,
    Usage,
    arguments_field,
    bad_response,
    finish_reason_field,
    parse_usage,
    reasoning_field,
    require_something,
    text_field,
)
from .sse import SSEDecoder

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
        if not isinstance(data, bytes):
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
        except FieldError as exc:
            raise bad_response(f"{exc} (stream chunk {self.chunks})") from None
        return False

    def _chunk(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        model = chunk.get("model")
        if model:
            self.model = model if type(model) is str else (meta(model) or self.model)
        if self.response_id is None:
            rid = chunk.get("id")
            self.response_id = rid if type(rid) is str else meta(rid)
        usage = chunk.get("usage")
        if usage is not None:
            self.usage = parse_usage(usage, "usage", self.warnings) or self.usage
        choices = chunk.get("choices")
        if not choices:
            return
        if not isinstance(choices, list):
            raise FieldError("choices", choices, "an array")
        choice = choices[0]
        if not isinstance(choice, dict):
            raise FieldError("choices[0]", choice, "an object")
        usage = choice.get("usage")
        if usage is not None:
            self.usage = parse_usage(usage, "choices[0].usage", self.warnings) or self.usage
        finish = choice.get("finish_reason")
        if finish is not None:
            self.finish_reason = finish_reason_field(finish, "choices[0].finish_reason", self.warnings) or self.finish_reason
        delta = choice.get("delta")
        if delta is None:
            delta = choice.get("message")
            if delta is None:
                return
        if not isinstance(delta, dict):
            raise FieldError("choices[0].delta", delta, "an object")
        text = delta.get("content")
        if text is not None:
            if type(text) is not str:
                text = text_field(text, "choices[0].delta.content")
            if text:
                self.content.append(text)
        reasoning = delta.get("reasoning_content")
        if reasoning is None:
            reasoning = delta.get("reasoning")
        if reasoning is not None:
            if type(reasoning) is not str:
                reasoning = reasoning_field(reasoning, f"choices[0].delta.reasoning_content (chunk {self.chunks})", self.warnings)
            if reasoning:
                self.reasoning.append(reasoning)
        calls = delta.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise FieldError("choices[0].delta.tool_calls", calls, "an array")
            for i, call in enumerate(calls):
                self._add_tool_delta(call, f"choices[0].delta.tool_calls[{i}]")

    def _add_tool_delta(self, call: Any, where: str) -> None:
        if not isinstance(call, dict):
            raise FieldError(where, call, "an object")
        index = call.get("index")
        if type(index) is not int:
            index = len(self.tools) if call.get("id") else max(self.tools, default=0)
        slot = self.tools.get(index)
        if slot is None:
            slot = self.tools[index] = {"id": None, "type": "function", "name": None, "arguments": []}
        cid = call.get("id")
        if cid is not None:
            if not isinstance(cid, str):
                raise FieldError(f"{where}.id", cid, "a string")
            if not slot["id"]:
                slot["id"] = cid  # keep the first id: some proxies change it mid-stream
        ctype = call.get("type")
        if ctype and isinstance(ctype, str):
            slot["type"] = ctype
        fn = call.get("function")
        if fn is None:
            return
        if not isinstance(fn, dict):
            raise FieldError(f"{where}.function", fn, "an object")
        name = fn.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise FieldError(f"{where}.function.name", name, "a string")
            if not slot["name"]:
                slot["name"] = name
        args = fn.get("arguments")
        if isinstance(args, dict):
            # An object is the whole arguments (a proxy that re-sends them with every delta),
            # never a fragment: the last one stands, as in a non-streaming answer.
            slot["arguments"] = [arguments_field(args, f"{where}.function.arguments")]
        elif args is not None:
            slot["arguments"].append(arguments_field(args, f"{where}.function.arguments"))

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
                    raise bad_response(f"the stream's tool call {index} has no function.name")
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
            warnings=tuple(dict.fromkeys(self.warnings)) if self.warnings else (),
        )
        require_something(answer)
        return answer
