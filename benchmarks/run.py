"""batchkimi's benchmark suite: every scenario in its own process against the simulator in
another, every figure a ratio against a baseline measured in the same run. Writes RESULTS.md.

    python benchmarks/run.py                 # everything (about ten minutes)
    python benchmarks/run.py --quick         # smaller sizes, shorter rate runs
    python benchmarks/run.py --only overhead,memory
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, WORK, SimProcess, run_scenario, write_prompts  # noqa: E402

Row = tuple[str, str, str, str, str]  # scenario, figure, value, baseline / target, verdict


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def overhead(n: int) -> list[Row]:
    rows: list[Row] = []
    data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    with SimProcess() as sim:
        for mode in ("plain", "stream"):
            base = run_scenario("baseline_client.py", sim.base_url, str(n), "64", mode)
            s0 = sim.cpu_s()
            bk = run_scenario("batchkimi_client.py", sim.base_url, str(data), str(WORK / "out_overhead"), "64", mode)
            server_cpu = sim.cpu_s() - s0
            server_share = server_cpu / bk["wall_s"]
            assert bk["ok"] == n, bk
            ratio = base["wall_s"] / bk["wall_s"]
            label = "non-streaming" if mode == "plain" else "streaming"
            rows.append((f"1. client overhead, {label}", f"throughput, {n} requests, C=64, zero latency",
                         f"{n / bk['wall_s']:.0f} req/s = **{ratio:.2f}x** the minimal loop ({n / base['wall_s']:.0f} req/s)",
                         "target >= 0.80x", verdict(ratio >= 0.8)))
            rows.append((f"1. client overhead, {label}", "client CPU per 1,000 requests",
                         f"{bk['cpu_s'] / n * 1000:.3f} s vs {base['cpu_s'] / n * 1000:.3f} s (**{bk['cpu_s'] / base['cpu_s']:.2f}x**)",
                         f"simulator core busy {server_share:.0%} during the run (not the bottleneck)", ""))
            rows.append((f"0. simulator, {label}", "requests served per simulator CPU-second (one core)",
                         f"**{n / server_cpu:,.0f} req/s**", f"batchkimi needed {n / bk['wall_s']:,.0f} req/s here: "
                         f"**{(n / server_cpu) / (n / bk['wall_s']):.2f}x** headroom", verdict(n / server_cpu > n / bk["wall_s"])))
    return rows


def steady_rate(stats: dict, skip_s: float) -> float:
    """Requests admitted per second over the middle of a run (its ramp-up and tail left out)."""
    per_s = {int(k): v for k, v in stats["admitted_per_s"].items()}
    if not per_s:
        return 0.0
    lo, hi = min(per_s) + int(skip_s) + 1, max(per_s) - int(skip_s) - 1
    window = range(lo, hi)
    return sum(per_s.get(s, 0) for s in window) / max(1, len(window))


def waiting(n: int, concurrency: int, latency_s: float) -> list[Row]:
    ideal = concurrency / latency_s
    with SimProcess(latency_ms=latency_s * 1000) as sim:
        base = run_scenario("waiting_client.py", "baseline", sim.base_url, str(n), str(concurrency), "plain")
        base_steady = steady_rate(sim.stats(), latency_s)
        sim.reset()
        bk = run_scenario("waiting_client.py", "batchkimi", sim.base_url, str(n), str(concurrency), "plain")
        steady = steady_rate(sim.stats(), latency_s)
    got = n / bk["wall_s"]
    return [
        ("2. waiting well", f"steady throughput, L={latency_s:g}s, C={concurrency}, {n} requests",
         f"{steady:.0f} req/s = **{steady / ideal:.3f}** of C/L ({ideal:.0f}/s); minimal loop {base_steady / ideal:.3f}",
         "target >= 0.95", verdict(steady / ideal >= 0.95)),
        ("2. waiting well", "whole-run throughput, ramp-up and tail included",
         f"{got:.0f} req/s = {got / ideal:.3f} of C/L; minimal loop {n / base['wall_s'] / ideal:.3f}",
         "(connecting 2,000 sockets and the last wave weigh on a short run)", ""),
    ]


def streams(n: int, concurrency: int, tokens_per_s: float) -> list[Row]:
    settings = {"tokens_per_s": tokens_per_s, "reasoning_words": 30, "answer_words": 20}
    out = []
    results = {}
    for kind in ("baseline", "batchkimi"):
        with SimProcess(**settings) as sim:
            s0 = sim.cpu_s()
            r = run_scenario("waiting_client.py", kind, sim.base_url, str(n), str(concurrency), "stream")
            chunks = sim.stats()["chunks"]
            r["server_busy"] = (sim.cpu_s() - s0) / r["wall_s"]
            r["chunks"] = chunks
            results[kind] = r
    bk, base = results["batchkimi"], results["baseline"]
    per_k = bk["cpu_s"] / bk["chunks"] * 1000
    per_stream_chunks_s = bk["chunks"] / n / (bk["wall_s"] * concurrency / n)  # chunks a stream sends per second
    held = 1000 / per_k / per_stream_chunks_s
    out.append(("3. streams", f"{concurrency} concurrent streams at {tokens_per_s:g} tokens/s, {n} in all",
                f"client CPU **{per_k * 1000:.1f} ms per 1,000 chunks** vs minimal loop {base['cpu_s'] / base['chunks'] * 1e6:.1f} ms "
                f"(**{per_k / (base['cpu_s'] / base['chunks'] * 1000):.2f}x**)", f"simulator core busy {bk['server_busy']:.0%}", ""))
    out.append(("3. streams", "streams one client core holds at this pace", f"about **{held:,.0f}**",
                f"{per_stream_chunks_s:.1f} chunks/s per stream; wall {bk['wall_s']:.1f}s vs minimal loop {base['wall_s']:.1f}s", ""))
    sim_per_k = bk["server_busy"] * bk["wall_s"] / bk["chunks"] * 1000
    out.append(("0. simulator, streams", "paced streams one simulator core holds",
                f"about **{1000 / sim_per_k / per_stream_chunks_s:,.0f}** ({sim_per_k * 1000:.1f} ms CPU per 1,000 chunks)",
                f"vs about {held:,.0f} for the client", verdict(1000 / sim_per_k >= 1000 / per_k)))
    return out


def memory(small: int, large: int) -> list[Row]:
    a = run_scenario("engine_client.py", "memory", str(small))
    b = run_scenario("engine_client.py", "memory", str(large))
    ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
    return [("4. memory", f"peak RSS, {small:,} vs {large:,} rows (whole engine, instant transport)",
             f"{a['peak_rss_mb']:.0f} MB vs {b['peak_rss_mb']:.0f} MB = **{ratio:.2f}x** ({large / b['wall_s']:,.0f} rows/s)",
             "target <= 1.2x", verdict(ratio <= 1.2))]


def resume(rows: int) -> list[Row]:
    done = rows - 1000
    run_scenario("engine_client.py", "prepare", str(rows), str(done))
    r = run_scenario("engine_client.py", "resume", str(rows))
    f = run_scenario("engine_client.py", "fresh", str(rows))
    assert r["already_done"] == done, r
    return [("5. resume", f"time to the first new request with {done:,} rows done",
             f"**{r['first_request_s']:.2f} s**; a fresh run over the same file: {f['first_request_s']:.2f} s "
             f"(**{r['first_request_s'] / f['first_request_s']:.2f}x**)", "", "")]


def rate(seconds: int) -> list[Row]:
    out = []
    for kind, limit in (("rpm", 600), ("tpm", 40000)):
        r = run_scenario("rate_client.py", kind, str(limit), str(seconds), timeout=seconds * 3 + 300)
        out.append((f"6. rate accuracy, {kind.upper()} {limit:,} binding", f"achieved share of the limit after the first minute ({r['seconds']:.0f} s run)",
                    f"**{r['achieved_share']:.1%}**", "target >= 97%", verdict(r["achieved_share"] >= 0.97)))
        out.append((f"6. rate accuracy, {kind.upper()} {limit:,} binding", "share of requests answered 429",
                    f"**{r['share_429']:.2%}** ({r['rate_limited']} of {r['requests']})", "target <= 1%", verdict(r["share_429"] <= 0.01)))
        out.append((f"6. rate accuracy, {kind.upper()} {limit:,} binding", "rows lost (answered 200 but not written ok)",
                    f"**{r['rows_lost']}**", "target 0", verdict(r["rows_lost"] == 0)))
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and shorter rate runs")
    ap.add_argument("--only", default="overhead,waiting,streams,memory,resume,rate")
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    q = args.quick
    plan = {
        "overhead": lambda: overhead(5000 if q else 20000),
        "waiting": lambda: waiting(4000 if q else 16000, 1000 if q else 2000, 5.0),
        "streams": lambda: streams(2000 if q else 4000, 1000 if q else 2000, 20.0),
        "memory": lambda: memory(10_000, 200_000 if q else 1_000_000),
        "resume": lambda: resume(201_000 if q else 1_001_000),
        "rate": lambda: rate(90 if q else 180),
    }
    rows: list[Row] = []
    for name in args.only.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        got = plan[name]()
        for r in got:
            print(" | ".join(r), file=sys.stderr, flush=True)
        rows += got
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# batchkimi benchmarks", "",
        f"Run {now} on {machine()}{' (--quick)' if q else ''}, with `python benchmarks/run.py{' --quick' if q else ''}`.",
        "Each scenario runs in its own process, against the simulator in another; every figure is",
        "compared with a baseline measured in the same run (a minimal aiohttp loop, the ideal C/L, or",
        "the smaller or fresh run).", "",
        "| scenario | figure | result | baseline / target | |", "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows], "",
    ]
    text = "\n".join(lines)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
