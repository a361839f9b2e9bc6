"""Waiting well / streams: batchkimi or the minimal loop against a slow server, timed in-process.

python waiting_client.py batchkimi|baseline|parser BASE_URL N CONCURRENCY stream|plain
("parser": the minimal loop that also splits and parses every chunk with batchkimi's SSE decoder
and stream assembler: what reading an answer costs, with no engine around it.)
Environment: BENCH_LOOP=uvloop|asyncio: the loop both clients run on (asyncio by default).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time

import aiohttp
from common import WORK, cpu_s, emit, run_loop, write_prompts

from batchkimi.http.sse import SSEDecoder

# Imported here, before any clock starts, by every kind: importing batchkimi costs about 0.45 s
# of CPU, which inside the timed part would be charged to the minimal loop's chunks.
from batchkimi.http.stream import StreamAssembler


async def baseline(base_url: str, n: int, concurrency: int, stream: bool, parse: bool = False) -> int:
    counter = iter(range(n))
    reads = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal reads
        for i in counter:
            body = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": f"What is {i} + 1? Reply with the number."}],
                    "thinking": {"type": "disabled"} if not stream else {"type": "enabled"}, "max_tokens": 4096, "stream": stream}
            async with session.post(base_url + "/chat/completions", data=json.dumps(body).encode(),
                                    headers={"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}) as r:
                if parse:
                    decoder, asm = SSEDecoder(), StreamAssembler()
                    async for chunk in r.content.iter_any():
                        reads += 1
                        for data in decoder.feed(chunk):
                            asm.add(data)
                else:
                    async for _ in r.content.iter_any():
                        reads += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return reads


def main(kind: str, base_url: str, n: int, concurrency: int, stream: bool) -> None:
    c0, t0 = cpu_s(), time.perf_counter()
    if kind in ("baseline", "parser"):
        run_loop(baseline(base_url, n, concurrency, stream, parse=kind == "parser"))
        ok = n
    else:
        import batchkimi
        import batchkimi.api  # noqa: F401 - loaded before the clock starts, as the minimal loop loads aiohttp

        data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
        out = WORK / f"out_wait_{stream}"
        shutil.rmtree(out, ignore_errors=True)
        job = batchkimi.Job(input=str(data), output=str(out), base_url=base_url, thinking="enabled" if stream else "disabled",
                            stream=stream, max_tokens=4096, concurrency=concurrency,
                            event_loop=os.environ.get("BENCH_LOOP", "asyncio"))
        c0, t0 = cpu_s(), time.perf_counter()
        summary = batchkimi.run(job)
        ok = summary.final_status.get("ok", 0)
    emit({"requests": n, "ok": ok, "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "stream")
