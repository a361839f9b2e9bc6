"""Memory and resume: the whole engine (read, build, limit, write, checkpoint) with an instant
in-process transport, so a million rows take a minute.

python engine_client.py memory ROWS          -> peak RSS of a fresh run over ROWS rows
python engine_client.py resume ROWS DONE     -> seconds until the first new request, after DONE rows
python engine_client.py fresh ROWS           -> seconds until the first request of a fresh run
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time

from common import WORK, emit, peak_rss_mb

import batchkimi
import batchkimi.api  # noqa: F401 - the package's names load when first used: load the engine before any clock starts
from batchkimi.http.response import Answer, Usage
from batchkimi.http.transport import Reply

ANSWER = Answer(content="positive", reasoning_content="The review praises the product. " * 8, tool_calls=None,
                finish_reason="stop", usage=Usage(40, 60, 100, 0), model="kimi-k2.6", response_id="chatcmpl-x")


class InstantTransport:
    def __init__(self) -> None:
        self.first_at: float | None = None
        self.calls = 0

    async def complete(self, body: dict, *, stream: bool, payload: bytes | None = None) -> Reply:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.calls += 1
        await asyncio.sleep(0)
        return Reply(ANSWER, 200, "req", None)


def dataset(rows: int):  # noqa: ANN201
    path = WORK / f"reviews_{rows}.jsonl"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            for i in range(rows):
                fh.write(json.dumps({"id": f"r{i}", "text": f"Review {i}: I love this kettle, it boils fast and looks great."}) + "\n")
    return path


def job(rows: int, out: str, **kw) -> batchkimi.Job:  # noqa: ANN003
    return batchkimi.Job(input=str(dataset(rows)), output=str(WORK / out), base_url="http://unused.invalid/v1",
                         prompt_template="Label as one of: positive, negative, neutral.\n\n{text}", keep_columns=("text",),
                         thinking="disabled", stream=False, max_tokens=16, concurrency=64, **kw)


def main() -> None:
    mode, rows = sys.argv[1], int(sys.argv[2])
    if mode == "memory":
        j = job(rows, f"out_mem_{rows}")
        shutil.rmtree(j.output, ignore_errors=True)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        summary = batchkimi.run(j, transport=InstantTransport())
        emit({"rows": rows, "ok": summary.final_status.get("ok", 0), "peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t0})
    elif mode == "prepare":
        done = int(sys.argv[3])
        j = job(rows, f"out_resume_{rows}", limit=done)
        shutil.rmtree(j.output, ignore_errors=True)  # type: ignore[arg-type]
        summary = batchkimi.run(j, transport=InstantTransport())
        emit({"rows": rows, "done": summary.final_status.get("ok", 0)})
    else:
        if mode == "fresh":
            j = job(rows, f"out_fresh_{rows}", limit=rows)
            shutil.rmtree(j.output, ignore_errors=True)  # type: ignore[arg-type]
        else:
            j = job(rows, f"out_resume_{rows}")
        t = InstantTransport()

        async def go() -> tuple[float, int]:
            stop = asyncio.Event()
            t0 = time.perf_counter()
            task = asyncio.create_task(batchkimi.run_async(j, transport=t, stop=stop))
            while t.first_at is None and not task.done():
                await asyncio.sleep(0.001)
            first = (t.first_at or time.perf_counter()) - t0
            stop.set()
            summary = await task
            return first, summary.already_done

        first, already = asyncio.run(go())
        emit({"rows": rows, "already_done": already, "first_request_s": first})


if __name__ == "__main__":
    main()
