"""The baseline: a minimal aiohttp loop that only sends and discards, same server, same concurrency.

python baseline_client.py BASE_URL N CONCURRENCY stream|plain
Environment: BENCH_LOOP=uvloop runs it on uvloop; BENCH_CA_FILE trusts a test CA (HTTPS);
BENCH_FORCE_CLOSE=1 opens a connection per request (the reference for what reuse saves).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import aiohttp
from common import client_ssl, cpu_s, emit, run_loop


async def main(base_url: str, n: int, concurrency: int, stream: bool) -> None:
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    chunks = 0
    ok = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal chunks, ok
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": f"What is {i} + 1? Reply with the number."}],
                    "thinking": {"type": "disabled"}, "max_tokens": 64, "stream": stream}
            async with session.post(base_url + "/chat/completions", data=json.dumps(body).encode(),
                                    headers={"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}) as r:
                if stream:
                    async for _chunk in r.content.iter_any():
                        chunks += 1
                else:
                    await r.read()
                ok += r.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=client_ssl(),
                                                                        force_close=os.environ.get("BENCH_FORCE_CLOSE") == "1")) as session:
        c0, t0 = cpu_s(), time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    emit({"requests": n, "ok": ok, "wall_s": wall, "cpu_s": cpu, "reads": chunks})


if __name__ == "__main__":
    run_loop(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "stream"))
