"""Captioning a folder of generated images: batchkimi's whole caption run, and a minimal loop
(read the file, base64 it, POST it with aiohttp, parse the answer) as the baseline.

python media_client.py gen FOLDER N                       # N distinct 320x240 JPEGs (kept between runs)
python media_client.py genvideo FOLDER N MB               # N distinct MB-sized "mp4" files (a real header, then noise)
python media_client.py caption BASE_URL FOLDER OUTPUT C [MB_IN_FLIGHT]   # batchkimi caption, in-process
python media_client.py baseline BASE_URL FOLDER C         # the minimal loop
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import shutil
import sys
import time
from pathlib import Path

from common import cpu_s, emit, peak_rss_mb

PROMPT = "Describe this image in one sentence."


def gen(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = sum(1 for _ in folder.rglob("*.jpg"))
    if have == n:
        emit({"images": n, "generated": 0})
        return
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = random.Random(n)
    base = Image.frombytes("RGB", (960, 720), os.urandom(960 * 720 * 3)).resize((960, 720))
    for i in range(n):
        x, y = rng.randrange(0, 640), rng.randrange(0, 480)
        sub = folder / f"d{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        base.crop((x, y, x + 320, y + 240)).save(sub / f"img{i:06d}.jpg", quality=85)
    emit({"images": n, "generated": n})


def genvideo(folder: Path, n: int, mb: int) -> None:
    head = (Path(__file__).resolve().parents[1] / "sample_data" / "media" / "videos" / "clip.mp4").read_bytes()
    size = mb * 1_000_000
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.mp4"))
    if len(files) == n and all(f.stat().st_size == size for f in files):
        emit({"videos": n, "generated": 0})
        return
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"v{i:05d}.mp4").write_bytes(head + os.urandom(size - len(head)))
    emit({"videos": n, "generated": n})


def caption(base_url: str, folder: str, output: str, concurrency: int, mb_in_flight: float = 256.0) -> None:
    import batchkimi
    import batchkimi.api  # noqa: F401 - loaded before the clock starts, as the minimal loop loads aiohttp

    shutil.rmtree(output, ignore_errors=True)
    job = batchkimi.Job(input=folder, input_format="folder", output=output, base_url=base_url, thinking="disabled",
                        stream=False, max_tokens=64, concurrency=concurrency, prompt_template=PROMPT,
                        max_mb_in_flight=mb_in_flight)
    c0, t0 = cpu_s(), time.perf_counter()
    summary = batchkimi.run(job)
    emit({"ok": summary.final_status.get("ok", 0), "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0,
          "peak_rss_mb": peak_rss_mb()})


async def _baseline(base_url: str, folder: str, concurrency: int) -> int:
    import aiohttp
    import orjson

    files = sorted(str(p) for p in Path(folder).rglob("*.jpg"))
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    for f in files:
        queue.put_nowait(f)
    ok = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        while (path := await queue.get()) is not None:
            with open(path, "rb") as fh:
                data = base64.b64encode(fh.read()).decode()
            body = {"model": "kimi-k2.6", "thinking": {"type": "disabled"}, "max_tokens": 64, "messages": [
                {"role": "user", "content": [{"type": "text", "text": PROMPT},
                                             {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + data}}]}]}
            async with session.post(base_url + "/chat/completions", data=orjson.dumps(body),
                                    headers={"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}) as r:
                answer = orjson.loads(await r.read())
                ok += bool(answer["choices"][0]["message"]["content"])

    for _ in range(concurrency):
        queue.put_nowait(None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker(session))
    return ok


def baseline(base_url: str, folder: str, concurrency: int) -> None:
    c0, t0 = cpu_s(), time.perf_counter()
    ok = asyncio.run(_baseline(base_url, folder, concurrency))
    emit({"ok": ok, "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0, "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "gen":
        gen(Path(sys.argv[2]), int(sys.argv[3]))
    elif what == "genvideo":
        genvideo(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif what == "caption":
        caption(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), *(float(a) for a in sys.argv[6:7]))
    else:
        baseline(sys.argv[2], sys.argv[3], int(sys.argv[4]))
