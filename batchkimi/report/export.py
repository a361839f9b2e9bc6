"""``batchkimi export``: a run's output as JSON Lines, CSV, or OpenAI Batch API output lines,
streamed a part at a time (flat memory whatever the run's size).

Rows come in the order their parts were written (sort by ``row`` for the input's order; the
OpenAI Batch API does not keep order either), one per input row: its newest attempt, with its
scores when ``_scores.parquet`` holds them for that attempt.

The ``openai-batch`` lines follow the Batch API's output file::

    {"id": "batch_req_<row>", "custom_id": "<id>", "response": {"status_code": 200,
     "request_id": "...", "body": {<a chat.completion>}}, "error": null}

A request the server refused keeps its HTTP answer, as the Batch API does: ``response:
{"status_code": 4xx/5xx, "request_id", "body": {"error": {"message", "type", "code"}}}`` and
``error: null``; ``error: {"code", "message"}`` with ``response: null`` is for a row that got no
HTTP response at all (a connection that failed, a row that could not make a request). The
``chat.completion``'s ``id`` is the completion's own (``chatcmpl-...``), and it keeps Kimi's
``reasoning_content`` beside ``content``.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..output.parts import iter_newest
from ..output.results import RESULT_COLUMNS
from ..output.sink import SCORES

FORMATS = ("jsonl", "csv", "openai-batch")


def _columns(out: Path) -> list[str]:
    from ..output import parts

    paths = parts.part_paths(out)
    if paths:
        return pq.read_schema(paths[-1]).names
    return parts.journal_schema(out, parts.journal_segments(out)).names if (out / "_journal").is_dir() else list(RESULT_COLUMNS)


def header(output: str | Path) -> list[str]:
    """Every column an exported row can have: the output's, then its scores' (the schema, not
    the first row: a row without a score still has the score columns, empty)."""
    out = Path(output)
    names = _columns(out)
    if (out / SCORES).exists():
        names += [c for c in pq.read_schema(out / SCORES).names if c not in ("row", "id", "finished_at") and c not in names]
    return names


def rows(output: str | Path, batch_rows: int = 2048) -> Iterator[dict[str, Any]]:
    """Every output row as a dict (timestamps as ISO text), a batch at a time."""
    out = Path(output)
    scores = pq.read_table(out / SCORES).drop_columns(["id"]) if (out / SCORES).exists() else None
    for table in iter_newest(out, _columns(out), journal=True):
        by_key: dict[Any, dict[str, Any]] = {}
        if scores is not None and table.num_rows:  # this part's rows' scores, for this very attempt
            for s in scores.filter(pc.is_in(scores.column("row"), value_set=table.column("row"))).to_pylist():
                by_key[(s.pop("row"), s.pop("finished_at"))] = s
        for batch in table.to_batches(max_chunksize=batch_rows):
            for r in batch.to_pylist():
                ts = r.get("finished_at")
                if by_key:
                    r.update(by_key.get((r["row"], ts), {}))
                if isinstance(ts, datetime.datetime):
                    r["finished_at"] = ts.isoformat()
                yield r


def openai_line(r: dict[str, Any]) -> dict[str, Any]:
    """One row as a line of an OpenAI Batch API output file."""
    line: dict[str, Any] = {"id": f"batch_req_{r['row']}", "custom_id": r["id"]}
    http_status = r.get("http_status")
    if r.get("status") in ("ok", "truncated") or (r.get("status") == "error" and http_status == 200):
        message: dict[str, Any] = {"role": "assistant", "content": r.get("content")}
        if r.get("reasoning_content") is not None:
            message["reasoning_content"] = r["reasoning_content"]
        if r.get("tool_calls"):
            message["tool_calls"] = orjson.loads(r["tool_calls"])
        usage = None
        if r.get("total_tokens") is not None:
            usage = {"prompt_tokens": r.get("prompt_tokens"), "completion_tokens": r.get("completion_tokens"),
                     "total_tokens": r.get("total_tokens"),
                     "prompt_tokens_details": {"cached_tokens": r.get("cached_tokens") or 0}}
        created = r.get("finished_at")
        epoch = int(datetime.datetime.fromisoformat(created).timestamp()) if isinstance(created, str) else None
        body = {"id": r.get("response_id") or f"chatcmpl-batchkimi-{r['row']}", "object": "chat.completion",
                "created": epoch, "model": r.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": r.get("finish_reason")}], "usage": usage}
        line["response"] = {"status_code": http_status or 200, "request_id": r.get("request_id"), "body": body}
        line["error"] = None
    elif isinstance(http_status, int) and http_status >= 400:  # the server answered with an error
        error = {"message": r.get("error_message"), "type": r.get("error_type"), "code": http_status}
        line["response"] = {"status_code": http_status, "request_id": r.get("request_id"), "body": {"error": error}}
        line["error"] = None
    else:  # no HTTP response: a connection that failed, a row that could not make a request
        line["response"] = None
        line["error"] = {"code": r.get("error_type") or r.get("status"), "message": r.get("error_message")}
    return line


def _cell(v: Any) -> Any:
    if v is None or isinstance(v, str | int | float | bool):
        return v
    return orjson.dumps(v, default=str).decode()


def export(output: str | Path, fmt: str, fh: IO[bytes]) -> int:
    """Write the output to ``fh`` in ``fmt``; the number of rows written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    n = 0
    if fmt == "csv":
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="", write_through=True)
        writer = csv.DictWriter(text, fieldnames=header(output), extrasaction="ignore")
        writer.writeheader()
        for r in rows(output):
            writer.writerow({k: _cell(v) for k, v in r.items()})
            n += 1
        text.flush()
        text.detach()
        return n
    for r in rows(output):
        fh.write(orjson.dumps(openai_line(r) if fmt == "openai-batch" else r, default=str) + b"\n")
        n += 1
    return n
