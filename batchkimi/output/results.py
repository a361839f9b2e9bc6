"""The result table: its schema, and the only constructors of result rows.

Every row the engine writes is made here (:func:`ok_row`, :func:`error_row`,
:func:`invalid_row`) and every value is coerced to its column's type on the way in, so
nothing a server sends (an ``id`` that is a number, a ``model`` that is a list) can reach
the journal with a type the Parquet schema refuses.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
import pyarrow as pa

# Per image or video of a row: never its bytes, enough to tell a changed file.
MEDIA_TYPE = pa.list_(pa.struct([
    ("path", pa.string()),  # as the row named it (relative to the media root), or the URL
    ("kind", pa.string()),  # image | video
    ("source", pa.string()),  # file (sent as base64) | url | data (a data URL in the row) | bytes (in the row)
    ("mime", pa.string()),
    ("bytes", pa.int64()),  # the file's size
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("sent_width", pa.int32()),  # after downscaling (max_image_side)
    ("sent_height", pa.int32()),
    ("sent_bytes", pa.int64()),  # the bytes encoded into the request
    ("sha256", pa.string()),  # of the file's content
]))

RESULT_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("row", pa.int64()),
    ("status", pa.string()),
    ("content", pa.string()),
    ("reasoning_content", pa.string()),
    ("tool_calls", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("total_tokens", pa.int64()),
    ("cached_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
    ("model", pa.string()),
    ("attempts", pa.int32()),
    ("latency_s", pa.float64()),
    ("ttft_s", pa.float64()),
    ("http_status", pa.int32()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("request_id", pa.string()),
    ("response_id", pa.string()),  # the completion's own id (chatcmpl-...), when it had one
    ("sample", pa.int32()),  # which of a row's samples (a job with samples > 1), else null
    ("max_tokens", pa.int64()),  # the max_tokens the row was sent with (null: none sent)
    ("warnings", pa.string()),  # what was odd in an answer that was kept, one line each
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("media", MEDIA_TYPE),
    ("media_gone", pa.bool_()),
]
RESULT_COLUMNS = [name for name, _ in RESULT_FIELDS]
STATUSES = ("ok", "error", "invalid", "truncated")
DONE_STATUSES = frozenset({"ok", "invalid"})
ERROR_MESSAGE_CHARS = 2000


def kept_column_name(column: str) -> str:
    """Kept input columns keep their name, unless it is a result column's: then ``input_<name>``."""
    return f"input_{column}" if column in RESULT_COLUMNS else column


def result_schema(keep_columns: Iterable[str] = ()) -> pa.Schema:
    fields = [pa.field(n, t) for n, t in RESULT_FIELDS]
    fields += [pa.field(kept_column_name(c), pa.string()) for c in keep_columns]
    return pa.schema(fields)


def now_ms() -> int:
    return int(time.time() * 1000)


def text(value: Any) -> str | None:
    """A value for a string column: strings as they are, anything else as JSON text."""
    if value is None or isinstance(value, str):
        return value
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return str(value)


def whole(value: Any) -> int | None:
    """A value for an integer column: a whole number, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 63) else None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def ok_row(
    rid: str, pos: int, *, status: str, content: str, reasoning_content: str | None, tool_calls: str | None,
    finish_reason: str | None, prompt_tokens: int | None, completion_tokens: int | None, total_tokens: int | None,
    cached_tokens: int | None, cost_usd: float | None, model: str | None, attempts: int, latency_s: float,
    ttft_s: float | None, http_status: int, error_type: str | None, error_message: str | None, request_id: str | None,
    max_tokens: int | None = None, warnings: tuple[str, ...] = (), response_id: str | None = None,
) -> dict[str, Any]:
    """A row for an answer (``ok``, or ``truncated``/``error`` by its finish reason). On every
    answer's path: values of the right type pass without a call."""
    return {
        "id": rid, "row": pos, "status": status,
        "content": content if type(content) is str else text(content),
        "reasoning_content": reasoning_content if reasoning_content is None or type(reasoning_content) is str else text(reasoning_content),
        "tool_calls": tool_calls if tool_calls is None or type(tool_calls) is str else text(tool_calls),
        "finish_reason": finish_reason if finish_reason is None or type(finish_reason) is str else text(finish_reason),
        "prompt_tokens": prompt_tokens if prompt_tokens is None or type(prompt_tokens) is int else whole(prompt_tokens),
        "completion_tokens": completion_tokens if completion_tokens is None or type(completion_tokens) is int else whole(completion_tokens),
        "total_tokens": total_tokens if total_tokens is None or type(total_tokens) is int else whole(total_tokens),
        "cached_tokens": cached_tokens if cached_tokens is None or type(cached_tokens) is int else whole(cached_tokens),
        "cost_usd": cost_usd,
        "model": model if model is None or type(model) is str else text(model),
        "attempts": attempts, "latency_s": round(latency_s, 4),
        "ttft_s": None if ttft_s is None else round(ttft_s, 4), "http_status": http_status,
        "error_type": error_type, "error_message": error_message,
        "request_id": request_id if request_id is None or type(request_id) is str else text(request_id),
        "response_id": response_id if response_id is None or type(response_id) is str else text(response_id),
        "max_tokens": max_tokens if max_tokens is None or type(max_tokens) is int else whole(max_tokens),
        "warnings": "\n".join(warnings)[:ERROR_MESSAGE_CHARS] if warnings else None,
        "finished_at": now_ms(),
    }


def error_row(rid: str, pos: int, *, model: str, attempts: int, latency_s: float, http_status: int | None,
              error_type: str, error_message: str, request_id: str | None, max_tokens: int | None = None) -> dict[str, Any]:
    """A row whose request failed after its retries."""
    return {
        "id": rid, "row": pos, "status": "error", "model": model, "attempts": attempts,
        "latency_s": round(latency_s, 4), "http_status": whole(http_status), "error_type": text(error_type),
        "error_message": (text(error_message) or "")[:ERROR_MESSAGE_CHARS], "request_id": text(request_id),
        "max_tokens": whole(max_tokens), "finished_at": now_ms(),
    }


def invalid_row(rid: str, pos: int, message: str) -> dict[str, Any]:
    """A row that cannot make a request; ``message`` names the file, row and column to fix."""
    return {
        "id": rid, "row": pos, "status": "invalid", "attempts": 0, "error_type": "invalid_row",
        "error_message": message[:ERROR_MESSAGE_CHARS], "finished_at": now_ms(),
    }


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (``finished_at`` in epoch milliseconds) as a table of ``schema``. A value of the
    wrong type becomes null rather than failing the whole batch: it cannot come from the
    constructors above, only from a journal written by something else."""
    columns = []
    for f in schema:
        values = [r.get(f.name) if isinstance(r, dict) else None for r in rows]
        kind = pa.int64() if f.name == "finished_at" else f.type
        try:
            arr = pa.array(values, type=kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            arr = pa.array([_one(v, kind) for v in values], type=kind)
        columns.append(arr if arr.type == f.type else arr.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _one(value: Any, kind: pa.DataType) -> Any:
    if pa.types.is_string(kind):
        return text(value)
    if pa.types.is_integer(kind):
        v = whole(value)
        half = 1 << (kind.bit_width - 1)
        return v if v is not None and -half <= v < half else None
    if pa.types.is_floating(kind):
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    return None
