"""Rate accuracy (the rate-limit issue): batchkimi against a simulator enforcing a limit, with
realistic latency, for a few minutes; the server's own counts say what was achieved.

python rate_client.py rpm|tpm|tpm-long LIMIT SECONDS [SKIP_S]

SKIP_S: the seconds left out before the share is measured (60: after the first minute).

``tpm-long``: the TPM limit bound by long outputs: the simulator's Kimi shape (heavy-tailed
thinking answers, 1.5 s to the first token, 60 tokens a second), thinking on, max_tokens 32,768.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time

from common import WORK, SimProcess, emit, write_prompts

import batchkimi
import batchkimi.api  # noqa: F401 - the package's names load when first used: load the engine before any clock starts


def main(kind: str, limit: int, seconds: int, skip: int = 60) -> None:
    if kind == "rpm":
        sim_settings = {"rpm": limit, "latency_ms": 1500, "reasoning_words": 40, "answer_words": 30}
        per_s = limit / 60
        rows = int(per_s * seconds)
        job_limits = {"rpm": limit, "concurrency": 256}
    elif kind == "tpm":
        sim_settings = {"tpm": limit, "latency_ms": 1500, "reasoning_words": 40, "answer_words": 30}
        rows = 100000
        job_limits = {"tpm": limit, "concurrency": 256}
    else:
        sim_settings = {"tpm": limit, "shape": "kimi"}
        rows = 100000
        job_limits = {"tpm": limit, "concurrency": 256}
    data = write_prompts(WORK / f"rate_{rows}.jsonl", rows, "Tell me something interesting about the number {i}.")
    out = WORK / f"out_rate_{kind}"
    shutil.rmtree(out, ignore_errors=True)
    with SimProcess(**sim_settings) as sim:
        job = batchkimi.Job(input=str(data), output=str(out), base_url=sim.base_url, stream=False,
                            max_tokens=32768 if kind == "tpm-long" else 4096,
                            thinking="enabled", backoff_base_s=1.0, **job_limits)
        async def go() -> batchkimi.Summary:
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(seconds, stop.set)
            return await batchkimi.run_async(job, stop=stop)

        t0 = time.perf_counter()
        summary = asyncio.run(go()) if kind != "rpm" else batchkimi.run(job)
        wall = time.perf_counter() - t0
        stats = sim.stats()
    admitted = {int(k): v for k, v in stats["admitted_per_s"].items()}
    tokens = {int(k): v for k, v in stats["tokens_per_s"].items()}
    end = max(admitted) if admitted else 0
    window = [s for s in range(skip, end)]  # after the first minute (or skip), until the last full second
    if kind == "rpm":
        achieved = sum(admitted.get(s, 0) for s in window) / max(1, len(window)) / per_s
    else:
        achieved = sum(tokens.get(s, 0) for s in window) / max(1, len(window)) * 60 / limit
    total = stats["requests"]
    limited = stats["by_status"].get("429", 0)
    df = batchkimi.read_results(out)
    written = len(df)
    answered = stats["by_status"].get("200", 0)
    emit({"kind": kind, "limit": limit, "seconds": round(wall, 1), "achieved_share": achieved, "requests": total,
          "rate_limited": limited, "share_429": limited / max(1, total), "rows_sent": summary.sent_rows,
          "rows_written": written, "answered_200": answered,
          # every 200 the server sent is a row written from it: ok, or truncated at max_tokens (Kimi's
          # long tail reaches 32,768), or a refusal the answer carried
          "rows_lost": answered - int((df["http_status"] == 200).sum()),
          "ok": summary.final_status.get("ok", 0)})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(int(a) for a in sys.argv[4:5]))
