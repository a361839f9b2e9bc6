"""What a server said when it said no: both error envelopes (TokenHub's
``type/code/message/source/upstream_*/request_id`` and Moonshot's ``type/message``), bodies
that are not JSON at all (a gateway's HTML page), and error events inside a stream, as an
:class:`~batchkimi.errors.APIError` built whole, with its request id and ``Retry-After``.
Whether it is retried is :mod:`batchkimi.policy.disposition`'s to say. Pure.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..errors import APIError, HTTPStatusError, ResponseError
from ..policy.disposition import classify


def meta(value: Any) -> str | None:
    """Metadata (``id``, ``model``): text if it is a scalar, else ignored. It is not the answer."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


_TRY_AGAIN = re.compile(r"try again (?:after|in) (\d+(?:\.\d+)?) ?s", re.IGNORECASE)


def snippet(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", errors="replace")
    text = re.sub(r"<[^>]+>", " ", text)  # an HTML gateway page: keep its words
    text = " ".join(text.split())
    return text + ("..." if len(body) > limit else "")


def retry_hint_from_message(message: str) -> float | None:
    """Moonshot's "... please try again after 3 seconds" as 3.0."""
    m = _TRY_AGAIN.search(message)
    return float(m.group(1)) if m else None


def error_from_payload(data: dict[str, Any], *, http_status: int, in_stream: bool = False,
                       request_id: str | None = None, retry_after_s: float | None = None) -> APIError:
    err = data.get("error")
    if not isinstance(err, dict):
        err = {"message": err if isinstance(err, str) else orjson.dumps(err, default=str).decode()}
    etype = meta(err.get("type")) or meta(err.get("upstream_code")) or meta(err.get("code")) or "api_error"
    code = meta(err.get("code"))
    message = err.get("message")
    message = message if isinstance(message, str) and message else (meta(message) or etype)
    request_id = meta(err.get("request_id")) or meta(data.get("request_id")) or request_id
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
        code=code,
        request_id=request_id,
        retryable=retryable,
        fatal=fatal,
        retry_after_s=retry_after_s if retry_after_s is not None else retry_hint_from_message(message),
    )


def error_from_response(status: int, body: bytes, content_type: str = "", *, request_id: str | None = None,
                        retry_after_s: float | None = None) -> APIError:
    """A non-2xx response as an :class:`APIError` (either envelope, or no JSON at all), with
    the response's request id and ``Retry-After`` when its body has none."""
    data: Any = None
    if body[:1] in (b"{", b"[") or "json" in content_type:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
    if isinstance(data, dict) and "error" in data:
        return error_from_payload(data, http_status=status, request_id=request_id, retry_after_s=retry_after_s)
    if isinstance(data, dict) and ("message" in data or "type" in data):
        return error_from_payload({"error": data}, http_status=status, request_id=request_id, retry_after_s=retry_after_s)
    etype = {413: "request_too_large"}.get(status, "http_error")
    retryable, fatal = classify(status, etype, "", None)
    text = snippet(body) or "(empty body)"
    return HTTPStatusError(
        f"HTTP {status} with a non-JSON body: {text}",
        error_type=etype,
        http_status=status,
        request_id=request_id,
        retryable=retryable,
        fatal=fatal,
        retry_after_s=retry_after_s,
    )
