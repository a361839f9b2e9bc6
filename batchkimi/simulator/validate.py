"""What the simulated TokenHub refuses in a chat request, with Kimi's own messages.

Every field is checked for its type before its value: a field of the wrong type is a 400 in
the configured envelope, never a crash of the handler. The rules are written here again, not
imported from the client's :mod:`batchkimi.kimi`: a simulator sharing the client's checks
would make the tests that use it tautological.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..kimi import ROLES
from ..tokens import URL_MEDIA_TOKENS, estimate_messages_tokens, image_tokens, video_tokens

MODELS = {
    "kimi-k2.6": {"created": 1776643200, "video": True},
    "kimi-k2.5": {"created": 1769472000, "video": False},
}
CONTEXT = 262144
DEFAULT_MAX_TOKENS = 32768
_FIXED = (("top_p", 0.95), ("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0))
_ROLES = tuple(sorted(ROLES))
# Kimi's accepted types, as the MIME type of a data URL.
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
VIDEO_TYPES = frozenset("video/" + f for f in "mp4 mpeg mov avi x-flv mpg webm wmv 3gpp".split())


class SimError(Exception):
    """An error answer: status, Moonshot ``type`` and message, and how TokenHub wraps it."""

    def __init__(self, status: int, etype: str, message: str, *, code: str | None = None, source: str = "gateway",
                 upstream: bool = False, retry_after_s: float | None = None, html: bool = False,
                 upstream_status: int | None = None, upstream_code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.etype, self.message, self.code = status, etype, message, code
        self.source, self.upstream, self.retry_after_s, self.html = source, upstream, retry_after_s, html
        self.upstream_status, self.upstream_code = upstream_status, upstream_code


def invalid(message: str, *, upstream: bool = True, code: str | None = None) -> SimError:
    return SimError(400, "invalid_request_error", message, upstream=upstream, code=code,
                    source="upstream" if upstream else "client")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    thinking: bool
    max_tokens: int
    stream: bool
    include_usage: bool
    json_mode: bool
    tools: list[dict[str, Any]] | None
    tool_choice: Any
    prompt_tokens: int = 0
    media: list[SeenMedia] = field(default_factory=list)
    light_messages: list[dict[str, Any]] | None = None  # messages with each data URL replaced by its digest


@dataclass(frozen=True)
class SeenMedia:
    """An image or video the simulated model "sees": what its caption and its usage come from."""

    kind: str  # image | video
    mime: str | None
    width: int | None
    height: int | None
    size_bytes: int | None
    tokens: int
    digest: str  # of the data, or of the URL


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _expect(body: dict[str, Any], name: str, ok: bool, what: str) -> None:
    if not ok:
        raise invalid(f"Invalid request: {name} must be {what}, got {_type_name(body.get(name))}")


def validate(body: dict[str, Any], key_models: list[str] | None, unknown_model_status: int,
             endpoints: dict[str, str] | None = None) -> ChatRequest:
    """The request, checked; raises :class:`SimError` as TokenHub/Kimi would answer. ``endpoints``
    maps TokenHub endpoint ids (``ep-...``) to the model each serves."""
    model = body.get("model")
    if model is None or model == "":
        raise invalid("invalid parameter 'model': model is required", upstream=False, code="400001")
    if not isinstance(model, str):
        raise invalid(f"invalid parameter 'model': model must be a string, got {_type_name(model)}", upstream=False, code="400001")
    if key_models is not None and model in (endpoints or {}) and model not in key_models:
        raise SimError(403, "permission_error", f"access denied: this API key may not use {model}", code="403002")
    model = (endpoints or {}).get(model, model)
    if model not in MODELS:
        if unknown_model_status == 404:
            raise SimError(404, "resource_not_found_error", f"Not found the model {model} or Permission denied")
        raise invalid(f"invalid parameter 'model': model {model} is not supported", upstream=False, code="400002")
    if key_models is not None and model not in key_models:
        raise SimError(403, "permission_error", f"access denied: this API key may not use {model}", code="403002")

    messages = body.get("messages")
    _expect(body, "messages", isinstance(messages, list) and bool(messages), "a non-empty array")

    thinking_obj = body.get("thinking")
    thinking = True
    keep_all = False
    if thinking_obj is not None:
        _expect(body, "thinking", isinstance(thinking_obj, dict), 'an object such as {"type": "enabled"}')
        ttype = thinking_obj.get("type", "enabled")
        if ttype not in ("enabled", "disabled"):
            raise invalid(f"Invalid request: thinking.type must be enabled or disabled, got {ttype!r}")
        keep = thinking_obj.get("keep")
        if keep not in (None, "all"):
            raise invalid(f"Invalid request: thinking.keep must be \"all\" or null, got {keep!r}")
        thinking = ttype == "enabled"
        keep_all = keep == "all"

    temperature = body.get("temperature")
    if temperature is not None:
        _expect(body, "temperature", _is_number(temperature), "a number")
        allowed = 1.0 if thinking else 0.6
        if float(temperature) != allowed:
            raise invalid(f"invalid temperature: only {allowed:g} is allowed for this model")
    for name, fixed in _FIXED:
        value = body.get(name)
        if value is not None:
            _expect(body, name, _is_number(value), "a number")
            if value != fixed:
                raise invalid(f"invalid {name}: only {fixed:g} is allowed for this model")

    stream = body.get("stream", False)
    _expect(body, "stream", stream is None or isinstance(stream, bool), "true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        _expect(body, "stream_options", isinstance(options, dict), "an object")
        inc = options.get("include_usage", False)
        if not isinstance(inc, bool):
            raise invalid("Invalid request: stream_options.include_usage must be true or false")
        include_usage = inc

    fmt = body.get("response_format")
    json_mode = False
    if fmt is not None:
        _expect(body, "response_format", isinstance(fmt, dict), 'an object such as {"type": "json_object"}')
        ftype = fmt.get("type")
        if ftype not in ("text", "json_object", "json_schema"):
            raise invalid(f"Invalid request: response_format.type must be text or json_object, got {ftype!r}")
        json_mode = ftype in ("json_object", "json_schema")

    tools = body.get("tools")
    if tools is not None:
        _expect(body, "tools", isinstance(tools, list) and all(isinstance(t, dict) for t in tools), "an array of tool objects")
        for i, t in enumerate(tools):
            fn = t.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise invalid(f"Invalid request: tools[{i}].function.name must be a string")
    choice = body.get("tool_choice")
    if choice is not None:
        _expect(body, "tool_choice", isinstance(choice, str | dict), "a string or an object")
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise invalid(f"Invalid request: tool_choice must be none, auto or required, got {choice!r}")
    if thinking and choice == "required":
        raise invalid("tool_choice 'required' is incompatible with thinking enabled")
    if thinking and isinstance(choice, dict):
        raise invalid("tool_choice 'specified' is incompatible with thinking enabled")

    stop = body.get("stop")
    if stop is not None:
        _expect(body, "stop", isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
                "a string or an array of strings")
        if isinstance(stop, list) and len(stop) > 5:
            raise invalid("Invalid request: stop may hold at most 5 strings")
    if body.get("seed") is not None:
        _expect(body, "seed", _whole(body["seed"]), "an integer")
    for name in ("prompt_cache_key", "safety_identifier", "user"):
        if body.get(name) is not None:
            _expect(body, name, isinstance(body[name], str), "a string")

    media: list[SeenMedia] = []
    seen_of: dict[int, SeenMedia] = {}
    for i, m in enumerate(messages):  # type: ignore[arg-type]
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise invalid(f"Invalid request: messages[{i}] has no valid role")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(f"Invalid request: messages[{i}].content must be a string or an array of parts")
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise invalid(f"Invalid request: messages[{i}].tool_calls must be an array of tool calls")
            if thinking and m.get("reasoning_content") is None:  # null is missing, as the client reads it
                raise invalid(f"thinking is enabled but reasoning_content is missing in assistant tool call message at index {i}")
        elif m["role"] != "tool" and (content is None or content == "" or content == []):
            raise invalid(f"Invalid request: messages[{i}].content must not be empty")
        if isinstance(content, str) and content.startswith("[{") and '"image_url"' in content:
            raise invalid(f"Your request exceeded model token limit : {CONTEXT}")
        if isinstance(content, list):
            for part in content:
                seen = _check_part(part, model, i)
                if seen is not None:
                    media.append(seen)
                    seen_of[id(part)] = seen

    max_tokens: Any = DEFAULT_MAX_TOKENS
    for name in ("max_completion_tokens", "max_tokens"):  # the first wins when both are sent
        value = body.get(name)
        if value is not None:
            if not _whole(value) or value < 1:
                raise invalid(f"Invalid request: {name} must be a positive integer, got {value!r}")
            max_tokens = value
            break
    def part_tokens(part: dict[str, Any]) -> int:
        seen = seen_of.get(id(part))
        return seen.tokens if seen is not None else URL_MEDIA_TOKENS

    # the history's reasoning is the model's input (and billed) only with thinking.keep = "all"
    prompt_tokens = estimate_messages_tokens(messages if isinstance(messages, list) else [], part_tokens,
                                             history_reasoning=keep_all)
    light = _light(messages, seen_of) if media else None  # type: ignore[arg-type]
    return ChatRequest(model, messages, thinking, max_tokens, bool(stream), include_usage, json_mode,  # type: ignore[arg-type]
                       tools, choice, prompt_tokens, media, light)


def _light(messages: list[dict[str, Any]], seen_of: dict[int, SeenMedia]) -> list[dict[str, Any]]:
    """``messages`` with each media part's URL swapped for the digest already taken of it: what
    seeds the answer, without hashing (or serialising) megabytes of base64 again."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                seen = seen_of.get(id(p))
                if seen is not None:
                    p = {"type": p["type"], p["type"]: {"url": f"{seen.mime or 'url'}:{seen.digest}"}}
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out


def _check_part(part: Any, model: str, i: int) -> SeenMedia | None:
    if not isinstance(part, dict):
        raise invalid(f"Invalid request: messages[{i}] has a content part that is not an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid(f"Invalid request: messages[{i}] has a text part without text")
        return None
    if kind not in ("image_url", "video_url"):
        raise invalid(f"Invalid request: unknown content part type {kind!r}")
    what = kind.split("_")[0]
    ref = part.get(kind)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if kind == "video_url" and not MODELS[model]["video"]:
        raise invalid(f"Invalid request: model {model} does not support video input")
    if not isinstance(url, str):
        raise invalid(f"unsupported {what} url")
    if url.startswith(("http://", "https://")):
        # TokenHub fetches public URLs; the simulator cannot, so it charges a flat count
        return SeenMedia(what, None, None, None, None, URL_MEDIA_TOKENS, hashlib.sha256(url.encode()).hexdigest()[:16])
    if not url.startswith("data:"):
        raise invalid(f"unsupported {what} url")
    head, sep, data = url.partition(",")
    mime = head[5:].split(";")[0].lower()
    if not sep or not head.endswith(";base64"):
        raise invalid(f"Invalid request: the {what} data URL must be base64")
    accepted = IMAGE_TYPES if what == "image" else VIDEO_TYPES
    if mime not in accepted:
        raise invalid(f"Invalid request: unsupported {what} format {mime or '(none)'}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"Invalid request: the {what} data is not valid base64") from None
    digest = hashlib.sha256(raw).hexdigest()[:16]
    if what == "video":
        if not _video_bytes(raw, mime):
            raise invalid(f"Invalid request: the video data is not {mime}")
        return SeenMedia("video", mime, None, None, len(raw), video_tokens(len(raw)), digest)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt, (width, height) = img.format, img.size
    except Exception:  # noqa: BLE001 - whatever Pillow raises, the image is unreadable
        raise invalid("Invalid request: the image cannot be decoded") from None
    if fmt not in IMAGE_TYPES.values():
        raise invalid(f"Invalid request: unsupported image format {str(fmt).lower()}")
    if IMAGE_TYPES[mime] != fmt:  # the label must name what the bytes are
        raise invalid(f"Invalid request: the image data is {str(fmt).lower()}, not {mime}")
    return SeenMedia("image", mime, width, height, len(raw), image_tokens(width, height), digest)


# The first bytes of each video container Kimi takes (by its MIME name): enough to tell junk, or
# another format, from the container the label names.
_VIDEO_MAGIC = {
    "mp4": (b"ftyp",), "mov": (b"ftyp", b"moov", b"mdat", b"wide", b"free"), "3gpp": (b"ftyp",),
    "avi": (b"AVI ",), "x-flv": (b"FLV",), "webm": (b"\x1a\x45\xdf\xa3",), "wmv": (b"\x30\x26\xb2\x75",),
    "mpeg": (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"), "mpg": (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"),
}


def _video_bytes(raw: bytes, mime: str) -> bool:
    """Whether ``raw`` starts like the container ``mime`` names (ISO media: its box type at byte 4;
    AVI: RIFF with the form type at byte 8)."""
    head = raw[:16]
    for magic in _VIDEO_MAGIC.get(mime.removeprefix("video/"), ()):
        if head.startswith(magic) or head[4:8] == magic or (magic == b"AVI " and head[:4] == b"RIFF" and head[8:12] == magic):
            return True
    return False
