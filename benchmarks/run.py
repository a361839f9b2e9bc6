"""batchkimi's benchmark suite: every scenario in its own process against the simulator in
another, every figure a ratio against a baseline measured in the same run. Writes RESULTS.md.

    python benchmarks/run.py                 # everything (about half an hour)
    python benchmarks/run.py --quick         # smaller sizes, shorter rate runs, fewer repeats
    python benchmarks/run.py --only overhead,memory --repeats 5

Speed figures vary between runs on a shared machine: each is measured ``--repeats`` times
(baseline and batchkimi alternating) and reported as the median with the range. A figure that
a run cannot measure (no steady window in a short run) is reported as not measured, never
as a number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, WORK, SimProcess, run_scenario, write_prompts  # noqa: E402

Row = tuple[str, str, str, str, str]  # scenario, figure, value, baseline / target, verdict


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


REPEATS = 3


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """The median, and the range when measured more than once: '0.91 (0.88-0.95, 3 runs)'."""
    med = fmt.format(statistics.median(values))
    if len(values) < 2:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))}, {len(values)} runs)"


def repeated(measure: Callable[[], dict]) -> list[dict]:
    return [measure() for _ in range(REPEATS)]


def overhead(n: int) -> list[Row]:
    rows: list[Row] = []
    data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    with SimProcess() as sim:
        for mode in ("plain", "stream"):
            ratios, cpu_ratios, headroom, busy, bk_rates, base_rates, bk_cpu, base_cpu = [], [], [], [], [], [], [], []
            for _ in range(REPEATS):
                base = run_scenario("baseline_client.py", sim.base_url, str(n), "64", mode)
                s0 = sim.cpu_s()
                bk = run_scenario("batchkimi_client.py", sim.base_url, str(data), str(WORK / "out_overhead"), "64", mode)
                server_cpu = sim.cpu_s() - s0
                assert bk["ok"] == n, bk
                ratios.append(base["wall_s"] / bk["wall_s"])
                cpu_ratios.append(bk["cpu_s"] / base["cpu_s"])
                bk_rates.append(n / bk["wall_s"])
                base_rates.append(n / base["wall_s"])
                bk_cpu.append(bk["cpu_s"] / n * 1000)
                base_cpu.append(base["cpu_s"] / n * 1000)
                busy.append(server_cpu / bk["wall_s"])
                headroom.append((n / server_cpu) / (n / bk["wall_s"]))
            label = "non-streaming" if mode == "plain" else "streaming"
            ratio = statistics.median(ratios)
            rows.append((f"1. client overhead, {label}", f"throughput, {n} requests, C=64, zero latency",
                         f"{statistics.median(bk_rates):.0f} req/s = **{spread(ratios)}x** the minimal loop "
                         f"({statistics.median(base_rates):.0f} req/s)", "target >= 0.80x", verdict(ratio >= 0.8)))
            rows.append((f"1. client overhead, {label}", "client CPU per 1,000 requests",
                         f"{statistics.median(bk_cpu):.3f} s vs {statistics.median(base_cpu):.3f} s (**{spread(cpu_ratios)}x**)",
                         f"simulator core busy {statistics.median(busy):.0%} during the run", ""))
            rows.append((f"0. simulator, {label}", "headroom: requests one simulator core serves / what batchkimi asked",
                         f"**{spread(headroom)}x**", "> 1: the simulator is not the bottleneck", verdict(min(headroom) > 1)))
    return rows


def _loop_env(loop: str, sim: SimProcess) -> dict[str, str]:
    env = {"BENCH_LOOP": loop}
    if sim.ca_file:
        env["BENCH_CA_FILE"] = sim.ca_file
    return env


def loops(n: int, tls: bool = False) -> list[Row]:
    """batchkimi on asyncio's loop and on uvloop against the minimal loop on asyncio (the
    baseline the issue names), plain and streamed; over HTTPS when ``tls``, with connections
    opened per 1,000 requests (TLS handshakes) counted by the simulator."""
    rows: list[Row] = []
    data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    settings = {"tls": True, "latency_ms": 20, "rtt_ms": 30} if tls else {}
    where = "over HTTPS, 30 ms round trips, answers after 20 ms" if tls else "plain HTTP, zero latency"
    with SimProcess(**settings) as sim:
        for mode in ("plain", "stream"):
            who_all = ("base", "asyncio", "uvloop", "reconnecting") if tls else ("base", "asyncio", "uvloop")
            got: dict[str, list[dict]] = {w: [] for w in who_all}
            conns: dict[str, list[float]] = {w: [] for w in who_all}
            for _ in range(REPEATS):
                for who in who_all:
                    sim.reset()
                    t0 = time.perf_counter()  # the whole process, as a user meets it: start-up included
                    if who == "reconnecting":  # the reference for what reuse saves: a connection per request
                        r = run_scenario("baseline_client.py", sim.base_url, str(n), "64", mode,
                                         env={**_loop_env("asyncio", sim), "BENCH_FORCE_CLOSE": "1"})
                    elif who == "base":
                        r = run_scenario("baseline_client.py", sim.base_url, str(n), "64", mode, env=_loop_env("asyncio", sim))
                    else:
                        r = run_scenario("batchkimi_client.py", sim.base_url, str(data), str(WORK / "out_loops"), "64", mode,
                                         env=_loop_env(who, sim))
                        assert r["ok"] == n, r
                    r["process_s"] = time.perf_counter() - t0
                    got[who].append(r)
                    conns[who].append(sim.stats()["connections"] / n * 1000)
            label = "non-streaming" if mode == "plain" else "streaming"
            base_rate = [n / r["wall_s"] for r in got["base"]]
            base_cpu = [r["cpu_s"] / n * 1e6 for r in got["base"]]
            for loop in ("asyncio", "uvloop"):
                rate = [n / r["wall_s"] for r in got[loop]]
                cpu = [r["cpu_s"] / n * 1e6 for r in got[loop]]
                ratio = [a / b for a, b in zip(rate, base_rate, strict=True)]
                cpu_ratio = [a / b for a, b in zip(cpu, base_cpu, strict=True)]
                scenario = f"11. {'TLS' if tls else 'event loops'}, {label}"
                rows.append((scenario, f"batchkimi on {loop}: throughput, {n} requests, C=64, {where}",
                             f"{statistics.median(rate):.0f} req/s = **{spread(ratio)}x** the minimal loop on asyncio "
                             f"({statistics.median(base_rate):.0f} req/s)", "target >= 1.0x on the default loop (uvloop)" if loop == "uvloop" else "",
                             verdict(statistics.median(ratio) >= 1.0) if loop == "uvloop" else ""))
                whole = [b["process_s"] / r["process_s"] for r, b in zip(got[loop], got["base"], strict=True)]
                rows.append((scenario, f"batchkimi on {loop}: whole process (start-up, reading, sending, final Parquet)",
                             f"**{spread(whole)}x** the minimal loop's process on asyncio "
                             f"({statistics.median([r['process_s'] for r in got[loop]]):.2f} s vs "
                             f"{statistics.median([b['process_s'] for b in got['base']]):.2f} s)",
                             "target >= 1.0x on the default loop" if loop == "uvloop" else "",
                             verdict(statistics.median(whole) >= 1.0) if loop == "uvloop" else ""))
                rows.append((scenario, f"batchkimi on {loop}: client CPU per request",
                             f"{statistics.median(cpu):.0f} µs vs {statistics.median(base_cpu):.0f} µs (**{spread(cpu_ratio)}x**)",
                             "", ""))
                if tls:
                    rows.append((scenario, f"batchkimi on {loop}: connections opened (TLS handshakes) per 1,000 requests",
                                 f"**{statistics.median(conns[loop]):.1f}** vs {statistics.median(conns['base']):.1f} for the minimal loop",
                                 "<= 64 connections in all: every one reused", verdict(max(conns[loop]) * n / 1000 <= 64)))
            if tls:
                rate = [n / r["wall_s"] for r in got["reconnecting"]]
                rows.append((f"11. TLS, {label}", "reference: the minimal loop opening a connection per request (no reuse)",
                             f"{statistics.median(rate):.0f} req/s = **{spread([a / b for a, b in zip(rate, base_rate, strict=True)])}x** "
                             f"the minimal loop; {statistics.median(conns['reconnecting']):.0f} connections per 1,000 requests",
                             "what reuse saves over a real network", ""))
    return rows


def steady_rate(stats: dict, concurrency: int) -> float | None:
    """Requests admitted per second once the first wave is out: (admitted - C) / (last admission -
    first admission). Ideal waves of C requests every L seconds give exactly C/L, a continuous
    client its rate; no window can cut a wave in two. None with fewer than three waves."""
    admitted, first, last = stats.get("admitted", 0), stats.get("admitted_first_s"), stats.get("admitted_last_s")
    if first is None or last is None or admitted < 3 * concurrency or last <= first:
        return None
    return (admitted - concurrency) / (last - first)


def waiting(n: int, concurrency: int, latency_s: float) -> list[Row]:
    ideal = concurrency / latency_s
    steady, base_steady, whole, base_whole = [], [], [], []
    with SimProcess(latency_ms=latency_s * 1000) as sim:
        for _ in range(REPEATS):
            sim.reset()
            base = run_scenario("waiting_client.py", "baseline", sim.base_url, str(n), str(concurrency), "plain")
            base_steady.append(steady_rate(sim.stats(), concurrency))
            sim.reset()
            bk = run_scenario("waiting_client.py", "batchkimi", sim.base_url, str(n), str(concurrency), "plain")
            steady.append(steady_rate(sim.stats(), concurrency))
            whole.append(n / bk["wall_s"] / ideal)
            base_whole.append(n / base["wall_s"] / ideal)
    name = f"steady throughput after the first wave, L={latency_s:g}s, C={concurrency}, {n} requests"
    if None in steady or None in base_steady:
        first: Row = ("2. waiting well", name, f"not measured: {n:,} requests at C={concurrency} are fewer than three waves "
                      "(run without --quick)", "target >= 0.95", "")
    else:
        shares = [x / ideal for x in steady]  # type: ignore[operator]
        first = ("2. waiting well", name, f"**{spread(shares, '{:.3f}')}** of C/L ({ideal:.0f}/s); minimal loop "
                 f"{spread([x / ideal for x in base_steady], '{:.3f}')}", "target >= 0.95",  # type: ignore[operator]
                 verdict(statistics.median(shares) >= 0.95))
    return [
        first,
        ("2. waiting well", "whole-run throughput, ramp-up and tail included",
         f"{spread(whole, '{:.3f}')} of C/L; minimal loop {spread(base_whole, '{:.3f}')}",
         f"(connecting {concurrency:,} sockets and the last wave weigh on a short run)", ""),
    ]


def _stream_run(kind: str, n: int, concurrency: int, settings: dict, loop: str) -> dict:
    with SimProcess(**settings) as sim:
        s0 = sim.cpu_s()
        r = run_scenario("waiting_client.py", kind, sim.base_url, str(n), str(concurrency), "stream", env={"BENCH_LOOP": loop})
        r["chunks"] = sim.stats()["chunks"]
        r["server_busy"] = (sim.cpu_s() - s0) / r["wall_s"]
    return r


LOOPS = ("asyncio", "uvloop")


def stream_chunks(n: int, concurrency: int) -> list[Row]:
    """Client CPU per chunk, on each event loop, against the minimal loop on the same loop, for
    streams of about 150 chunks and of about 600 (2,400 tokens: a thinking answer's length).
    Each request's own costs (build, send, headers, the row, Parquet) are spread over its chunks,
    the more so the longer the stream: the longer streams give the chunks' own cost. One run per
    client and loop, no difference of two runs (whose noise made the figure swing between 0.76x
    and 1.23x before). A third client, the minimal loop that also parses each chunk, shows where
    the difference goes: reading the chunk, or the engine around it."""
    lengths = [({"tokens_per_s": 100.0, "reasoning_words": 400, "answer_words": 100}, n, concurrency),
               ({"tokens_per_s": 400.0, "reasoning_words": 1600, "answer_words": 400}, max(1, n * 3 // 5), concurrency * 3 // 5)]
    out: list[Row] = []
    for settings, count, c in lengths:
        for loop in LOOPS:
            per: dict[str, list[float]] = {"baseline": [], "parser": [], "batchkimi": []}
            busy: list[float] = []
            chunks_per_stream = 0.0
            for _ in range(REPEATS):
                for kind in ("baseline", "parser", "batchkimi"):
                    r = _stream_run(kind, count, c, settings, loop)
                    assert r["ok"] == count, r
                    per[kind].append(r["cpu_s"] / r["chunks"] * 1e6)
                    chunks_per_stream = r["chunks"] / count
                    if kind == "batchkimi":
                        busy.append(r["server_busy"])
            ratio = [a / b for a, b in zip(per["batchkimi"], per["baseline"], strict=True)]
            name = f"3. streams, per chunk, {loop}"
            out.append((name, f"client CPU per chunk, {c} streams of about {chunks_per_stream:.0f} chunks at "
                        f"{settings['tokens_per_s']:g} tokens/s, {count} in all, all costs included",
                        f"**{spread(per['batchkimi'], '{:.1f}')} µs** vs minimal loop on {loop} {spread(per['baseline'], '{:.1f}')} µs "
                        f"(**{spread(ratio)}x**)", f"target <= 1.15x; simulator core busy {statistics.median(busy):.0%}",
                        verdict(statistics.median(ratio) <= 1.15)))
            parse = [a / b for a, b in zip(per["parser"], per["baseline"], strict=True)]
            engine = [a / b for a, b in zip(per["batchkimi"], per["parser"], strict=True)]
            out.append((name, f"where it goes ({chunks_per_stream:.0f} chunks a stream): the minimal loop that also parses "
                        "each chunk (batchkimi's SSE decoder and assembler, no engine)",
                        f"{spread(per['parser'], '{:.1f}')} µs = **{spread(parse)}x** the minimal loop; batchkimi is "
                        f"**{spread(engine)}x** this parsing loop", "the engine's own share is the second ratio", ""))
    return out


def stream_scale(concurrencies: list[int], tokens_per_s: float) -> list[Row]:
    """Many short paced streams at once (about 20 chunks each, two per connection slot):
    client CPU per 1,000 chunks against the minimal loop on the same loop, how many such
    streams one client core would hold, and whether the simulator kept up."""
    settings = {"tokens_per_s": tokens_per_s, "reasoning_words": 30, "answer_words": 20}
    out: list[Row] = []
    for concurrency in concurrencies:
        n = 2 * concurrency
        for loop in LOOPS:
            per: dict[str, list[float]] = {"baseline": [], "batchkimi": []}
            held, sim_held, busy, walls, base_walls = [], [], [], [], []
            for _ in range(REPEATS):
                for kind in ("baseline", "batchkimi"):
                    r = _stream_run(kind, n, concurrency, settings, loop)
                    assert r["ok"] == n, r
                    per[kind].append(r["cpu_s"] / r["chunks"] * 1e6)
                    (walls if kind == "batchkimi" else base_walls).append(r["wall_s"])
                    if kind == "batchkimi":
                        # one stream's chunks per second of its own life: chunks / (streams x stream time)
                        chunk_rate = r["chunks"] / n / (r["wall_s"] * concurrency / n)
                        held.append(1e6 / (r["cpu_s"] / r["chunks"] * 1e6) / chunk_rate)
                        sim_held.append(1 / (r["server_busy"] * r["wall_s"] / r["chunks"]) / chunk_rate)
                        busy.append(r["server_busy"])
            ratio = [a / b for a, b in zip(per["batchkimi"], per["baseline"], strict=True)]
            name = f"3. streams at scale, {loop}"
            out.append((name, f"{concurrency:,} concurrent streams at {tokens_per_s:g} tokens/s (about 20 chunks each), {n:,} in all",
                        f"client CPU **{spread(per['batchkimi'], '{:.1f}')} µs per chunk** vs minimal loop {spread(per['baseline'], '{:.1f}')} µs "
                        f"(**{spread(ratio)}x**); wall {statistics.median(walls):.1f} s vs {statistics.median(base_walls):.1f} s",
                        f"simulator core busy {statistics.median(busy):.0%}", ""))
            sim_bound = statistics.median(busy) >= 0.9 or statistics.median(sim_held) < statistics.median(held)
            out.append((name, f"streams one client core holds at this pace ({concurrency:,} at once)",
                        f"about **{spread(held, '{:,.0f}')}**; one simulator core: about {spread(sim_held, '{:,.0f}')}",
                        "the simulator was the bottleneck: the client's figure is a floor" if sim_bound else "the simulator kept up",
                        ""))
    return out


def ray_scaling(n: int, concurrency: int) -> list[Row]:
    """The Ray engine with 1, 2 and 4 actors on this machine (a one-machine cluster each run),
    paced thinking streams, against the local engine on the same simulator; streams and chunks
    per second from the simulator's side (first admission to last), and the limit actor's CPU
    per permit it leased."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return [("12. Ray", "streams per second with 1, 2, 4 actors", "not measured: Ray is not installed "
                 "(pip install -e '.[ray]')", "", "")]
    settings = {"tokens_per_s": 50.0, "reasoning_words": 60, "answer_words": 30}
    data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    out: list[Row] = []
    rates: dict[int, list[float]] = {}
    chunk_rates: dict[int, list[float]] = {}
    per_permit, per_permit_all, per_lease, starts = [], [], [], []
    with SimProcess(**settings) as sim:
        for _ in range(REPEATS):
            for actors in (0, 1, 2, 4):
                sim.reset()
                r = run_scenario("ray_client.py", sim.base_url, str(data), str(WORK / "out_ray"), str(concurrency), str(actors))
                assert r["ok"] == n, r
                st = sim.stats()
                window = st["admitted_last_s"] - st["admitted_first_s"]
                rates.setdefault(actors, []).append((st["admitted"] - 1) / window)
                chunk_rates.setdefault(actors, []).append(rates[actors][-1] * st["chunks"] / st["admitted"])
                if actors:
                    per_permit.append(r["limit_cpu_s"] / max(1, r["permits"]) * 1e6)
                    per_permit_all.append(r["limit_process_cpu_s"] / max(1, r["permits"]) * 1e6)
                    per_lease.append(r["permits"] / max(1, r["leases"]))
                    starts.append(r["start_s"])
    local = statistics.median(rates[0])
    for actors in (1, 2, 4):
        ratio = [a / b for a, b in zip(rates[actors], rates[0], strict=True)]
        out.append(("12. Ray", f"{actors} actor{'s' if actors > 1 else ''}: {n:,} paced thinking streams, C={concurrency}",
                    f"**{spread(rates[actors], '{:.0f}')} streams/s**, {spread(chunk_rates[actors], '{:,.0f}')} chunks/s; "
                    f"**{spread(ratio)}x** the local engine ({local:.0f} streams/s)",
                    f"{os.cpu_count()} cores shared with the simulator and the driver", ""))
    out.append(("12. Ray", "the cluster limit actor: CPU per permit leased, its whole process (Ray's call handling included)",
                f"**{spread(per_permit_all, '{:.0f}')} µs**, of which the lease itself {spread(per_permit, '{:.1f}')} µs; "
                f"{spread(per_lease, '{:.1f}')} permits per lease",
                "one actor core serves about 1 s / that permits a second", ""))
    out.append(("12. Ray", "starting a one-machine cluster (ray.init)", f"{spread(starts, '{:.1f}')} s", "not in the figures above", ""))
    return out


def memory(small: int, large: int) -> list[Row]:
    a = run_scenario("engine_client.py", "memory", str(small))
    b = run_scenario("engine_client.py", "memory", str(large))
    ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
    return [("4. memory", f"peak RSS, {small:,} vs {large:,} rows (whole engine, instant transport)",
             f"{a['peak_rss_mb']:.0f} MB vs {b['peak_rss_mb']:.0f} MB = **{ratio:.2f}x** ({large / b['wall_s']:,.0f} rows/s)",
             "target <= 1.2x", verdict(ratio <= 1.2))]


def media(small: int, large: int, concurrency: int = 32) -> list[Row]:
    """Captioning folders of generated 320x240 JPEGs: peak memory as the folder grows, and the
    client's CPU per image against a minimal read-base64-POST loop on the same files."""
    folders = {n: WORK / f"images_{n}" for n in (small, large)}
    for n, folder in folders.items():
        run_scenario("media_client.py", "gen", str(folder), str(n), timeout=3600)
    rows: list[Row] = []
    with SimProcess() as sim:
        peaks: dict[int, float] = {}
        for n in (small, large):
            got = run_scenario("media_client.py", "caption", sim.base_url, str(folders[n]), str(WORK / "out_media"), str(concurrency))
            assert got["ok"] == n, got
            peaks[n] = got["peak_rss_mb"]
        ratio = peaks[large] / peaks[small]
        rows.append(("9. media folders", f"peak RSS captioning {small:,} vs {large:,} images (C={concurrency})",
                     f"{peaks[small]:.0f} MB vs {peaks[large]:.0f} MB = **{ratio:.2f}x**", "target <= 1.2x", verdict(ratio <= 1.2)))
        cpu, base_cpu, ratios, rates, base_rates = [], [], [], [], []
        for _ in range(REPEATS):
            base = run_scenario("media_client.py", "baseline", sim.base_url, str(folders[small]), str(concurrency))
            bk = run_scenario("media_client.py", "caption", sim.base_url, str(folders[small]), str(WORK / "out_media"), str(concurrency))
            assert base["ok"] == small and bk["ok"] == small, (base, bk)
            cpu.append(bk["cpu_s"] / small * 1000)
            base_cpu.append(base["cpu_s"] / small * 1000)
            ratios.append(bk["cpu_s"] / base["cpu_s"])
            rates.append(small / bk["wall_s"])
            base_rates.append(small / base["wall_s"])
        rows.append(("9. media folders", f"client CPU per image, {small:,} images (walk, check, hash, base64, send, write)",
                     f"{statistics.median(cpu):.2f} ms vs {statistics.median(base_cpu):.2f} ms for the minimal loop "
                     f"(**{spread(ratios)}x**); {statistics.median(rates):.0f} vs {statistics.median(base_rates):.0f} images/s",
                     "reported", ""))
    rows += media_videos(40, 160, 6, budget_mb=64)
    return rows


def media_videos(small: int, large: int, mb: int, budget_mb: int, concurrency: int = 32) -> list[Row]:
    """Large files under the bytes-in-flight budget: 32 workers, but only budget_mb of requests
    held at once, however many videos the folder has."""
    peaks: dict[int, float] = {}
    with SimProcess(latency_ms=200) as sim:
        for n in (small, large):
            folder = WORK / f"videos_{n}x{mb}"
            run_scenario("media_client.py", "genvideo", str(folder), str(n), str(mb), timeout=3600)
            got = run_scenario("media_client.py", "caption", sim.base_url, str(folder), str(WORK / "out_media"),
                               str(concurrency), str(budget_mb))
            assert got["ok"] == n, got
            peaks[n] = got["peak_rss_mb"]
        held = sim.stats()["peak_body_bytes_in_flight"] / 1e6
    ratio = peaks[large] / peaks[small]
    unbounded = concurrency * mb * 4 / 3
    return [("9. media folders", f"peak RSS captioning {small} vs {large} videos of {mb} MB, C={concurrency}, "
             f"max_mb_in_flight={budget_mb}",
             f"{peaks[small]:.0f} MB vs {peaks[large]:.0f} MB = **{ratio:.2f}x**; at most {held:.0f} MB of requests at the "
             f"simulator at once (without the budget: {unbounded:.0f} MB)", "target <= 1.2x", verdict(ratio <= 1.2))]


def scoring(small: int, large: int) -> list[Row]:
    """Extracting and scoring a written output (labels): memory as it grows, time per row
    against a minimal read-and-compare loop."""
    for n in (small, large):
        run_scenario("scoring_client.py", "make", str(n), timeout=3600)
    a = run_scenario("scoring_client.py", "score", str(small))
    b = run_scenario("scoring_client.py", "score", str(large))
    base = run_scenario("scoring_client.py", "baseline", str(large))
    assert b["rows"] == b["scored"] == large, b
    ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
    return [("10. scoring", f"peak RSS scoring {small:,} vs {large:,} rows (label extraction + label scorer)",
             f"{a['peak_rss_mb']:.0f} MB vs {b['peak_rss_mb']:.0f} MB = **{ratio:.2f}x**", "target <= 1.2x", verdict(ratio <= 1.2)),
            ("10. scoring", f"time to score {large:,} rows",
             f"**{b['wall_s']:.1f} s** ({large / b['wall_s']:,.0f} rows/s); a minimal read-and-compare loop: "
             f"{base['wall_s']:.1f} s (**{b['wall_s'] / base['wall_s']:.1f}x**)", "in seconds", "")]


def resume(rows: int) -> list[Row]:
    done = rows - 1000
    run_scenario("engine_client.py", "prepare", str(rows), str(done))
    r = run_scenario("engine_client.py", "resume", str(rows))
    f = run_scenario("engine_client.py", "fresh", str(rows))
    assert r["already_done"] == done, r
    return [("5. resume", f"time to the first new request with {done:,} rows done",
             f"**{r['first_request_s']:.2f} s**; a fresh run over the same file: {f['first_request_s']:.2f} s "
             f"(**{r['first_request_s'] / f['first_request_s']:.2f}x**)", "", "")]


def rate(seconds: int, repeats: int) -> list[Row]:
    out = []
    for kind, limit in (("rpm", 600), ("tpm", 40000)):
        runs = [run_scenario("rate_client.py", kind, str(limit), str(seconds), timeout=seconds * 3 + 300) for _ in range(repeats)]
        shares = [r["achieved_share"] for r in runs]
        share_429 = [r["share_429"] for r in runs]
        lost = [r["rows_lost"] for r in runs]
        name = f"6. rate accuracy, {kind.upper()} {limit:,} binding"
        out.append((name, f"achieved share of the limit after the first minute ({seconds} s runs)",
                    f"**{spread([x * 100 for x in shares], '{:.1f}')}%**", "target >= 97%", verdict(min(shares) >= 0.97)))
        out.append((name, "share of requests answered 429", f"**{spread([x * 100 for x in share_429], '{:.2f}')}%** "
                    f"({sum(r['rate_limited'] for r in runs)} of {sum(r['requests'] for r in runs)})", "target <= 1%",
                    verdict(max(share_429) <= 0.01)))
        out.append((name, "rows lost (answered 200 but not written ok), each run stopped by its timer",
                    f"**{', '.join(map(str, lost))}** in {repeats} consecutive runs", "target 0", verdict(not any(lost))))
    return out


def long_outputs(seconds: int, limit: int) -> list[Row]:
    """A TPM limit bound by long outputs (the simulator's Kimi shape: heavy-tailed thinking
    answers, max_tokens 32,768), against the same limit with short answers, in the same run."""
    short = run_scenario("rate_client.py", "tpm", str(limit), str(seconds), timeout=seconds * 3 + 300)
    long = run_scenario("rate_client.py", "tpm-long", str(limit), str(seconds), timeout=seconds * 3 + 300)
    name = f"16. TPM {limit:,} bound by long outputs"
    return [
        (name, f"achieved share of the limit after the first minute ({seconds} s runs)",
         f"**{long['achieved_share'] * 100:.1f}%** (short answers: {short['achieved_share'] * 100:.1f}%)", "target >= 95%",
         verdict(long["achieved_share"] >= 0.95)),
        (name, "share of requests answered 429",
         f"**{long['share_429'] * 100:.1f}%** ({long['rate_limited']} of {long['requests']}; short answers: "
         f"{short['share_429'] * 100:.1f}%)", "target <= 1%", verdict(long["share_429"] <= 0.01)),
        (name, "rows lost (answered 200, no row written from it)", f"**{long['rows_lost']}** (short answers: {short['rows_lost']})",
         "target 0", verdict(long["rows_lost"] == 0 and short["rows_lost"] == 0)),
    ]


def long_outputs_steady(seconds: int, skip: int, limit: int) -> list[Row]:
    """Scenario 16 run long enough to fill the pipeline: answers that take up to nine minutes
    land in the server's minute that long after they were sent, so the first minutes of a run
    count less than it sends; measured after ``skip`` seconds."""
    long = run_scenario("rate_client.py", "tpm-long", str(limit), str(seconds), str(skip), timeout=seconds * 3 + 300)
    name = f"16. TPM {limit:,} bound by long outputs, {seconds} s"
    return [
        (name, f"achieved share of the limit after the first {skip} s",
         f"**{long['achieved_share'] * 100:.1f}%**", "target >= 95%", verdict(long["achieved_share"] >= 0.95)),
        (name, "share of requests answered 429; rows lost",
         f"**{long['share_429'] * 100:.1f}%** ({long['rate_limited']} of {long['requests']}); {long['rows_lost']} lost",
         "<= 1%; 0", verdict(long["share_429"] <= 0.01 and long["rows_lost"] == 0)),
    ]


def faulted_vs_clean(n: int, concurrency: int, latency_s: float, clean: tuple[Path, dict], faulted: tuple[Path, dict],
                     count: Callable[[dict], int]) -> tuple[list[float], list[float]]:
    """The faulted run's wall time over the clean run's (``REPEATS`` pairs), and the faults the
    simulator counted in each faulted run."""
    ratios: list[float] = []
    faults: list[float] = []
    for _ in range(REPEATS):
        walls = {}
        for label, (data, settings) in (("clean", clean), ("faulted", faulted)):
            with SimProcess(latency_ms=latency_s * 1000, **settings) as sim:
                r = run_scenario("batchkimi_client.py", sim.base_url, str(data), str(WORK / "out_faulted"), str(concurrency), "plain")
                assert r["ok"] == n, r
                walls[label] = r["wall_s"]
                if label == "faulted":
                    faults.append(count(sim.stats()))
        ratios.append(walls["faulted"] / walls["clean"])
    return ratios, faults


def overload(n: int, concurrency: int, latency_s: float, rate: float) -> list[Row]:
    """Sparse engine_overloaded 429s (no Retry-After): they should cost their own requests a
    backoff, not slow the whole job."""
    data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    ratios, faults = faulted_vs_clean(n, concurrency, latency_s, (data, {}), (data, {"overload_rate": rate}),
                                      lambda stats: stats["by_error"].get("engine_overloaded_error", 0))
    return [("7. sparse overload 429s", f"{n:,} rows, C={concurrency}, L={latency_s:g}s, {rate:.1%} of requests answered "
             "engine_overloaded (no Retry-After)",
             f"wall time **{spread(ratios)}x** the fault-free run ({spread(faults, '{:.0f}')} overloads)", "target <= 1.2x",
             verdict(statistics.median(ratios) <= 1.2))]


def paced_429s(n: int, faulted: int, concurrency: int, latency_s: float) -> list[Row]:
    """Sparse rate-limit 429s with a short Retry-After (2 s): the server pacing single requests.
    They should cost those requests their wait, not the whole job's pace."""
    step = n // faulted
    clean = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    paced = WORK / f"prompts_{n}_paced.jsonl"
    with open(paced, "w") as fh:
        for i in range(n):
            mark = " [[sim:429*1]]" if i % step == 0 and i // step < faulted else ""
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + 1? Reply with the number.{mark}"}) + "\n")
    ratios, faults = faulted_vs_clean(n, concurrency, latency_s, (clean, {}), (paced, {}),
                                      lambda stats: stats["by_status"].get("429", 0))
    return [("13. sparse short Retry-After 429s", f"{n:,} rows, C={concurrency}, L={latency_s:g}s, {faulted} rows answered "
             "one rate-limit 429 with Retry-After: 2",
             f"wall time **{spread(ratios)}x** the fault-free run ({spread(faults, '{:.0f}')} 429s)", "target <= 2x",
             verdict(statistics.median(ratios) <= 2.0))]


def budget_use(n: int, budgets: list[float], max_tokens: int, concurrency: int, reasoning_words: int,
               kimi_shape: bool = False) -> list[Row]:
    """A cost budget on a thinking-length dataset: never passed (the simulator's own count of
    the tokens it served, at kimi-k2.6's list prices, is the independent bill), and how much of
    it the run gets to use. ``kimi_shape``: the simulator's heavy-tailed Kimi lengths (time run
    50x faster) instead of answers of about ``reasoning_words``."""
    data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    rows: list[Row] = []
    settings: dict[str, Any] = ({"shape": "kimi", "speed": 50} if kimi_shape else
                                {"reasoning_words": reasoning_words, "answer_words": 40, "latency_ms": 200})
    for budget in budgets:
        with SimProcess(**settings) as sim:
            r = run_scenario("budget_client.py", sim.base_url, str(data), str(WORK / "out_budget"), str(budget),
                             str(max_tokens), str(concurrency))
            st = sim.stats()
        billed = ((st["prompt_tokens"] - st["cached_tokens"]) * 0.95 + st["cached_tokens"] * 0.16
                  + st["completion_tokens"] * 4.00) / 1e6
        per = billed / max(1, st["requests"])
        worst = max_tokens * 4.00 / 1e6  # a request's worst case: its whole max_tokens
        roomy = budget >= 10 * worst  # a ceiling must stop a worst case short of the budget
        rows.append(("14. a cost budget" + (", Kimi's heavy-tailed lengths" if kimi_shape else ""), f"${budget:g} budget ({budget / worst:.1f} worst cases of ${worst:.3f}), "
                     f"max_tokens {max_tokens:,}, C={concurrency}, answers of about "
                     f"{st['completion_tokens'] // max(1, st['requests']):,} completion tokens (${per:.4f} a request)",
                     f"**{billed / budget:.1%}** of the budget billed by the server (${billed:.4f}; batchkimi counted "
                     f"${r['cost_usd']:.4f}), {st['requests']} requests",
                     "never over" + ("; >= 90% used" if roomy else " (too small a budget to use 90% of)"),
                     verdict(billed <= budget + 1e-9 and (billed / budget >= 0.9 or not roomy))))
    return rows


def storage(n: int) -> list[Row]:
    """The same job, input and output local or in a bucket on the loopback S3 server (moto, in
    its own process): throughput, the client's peak memory, objects written per 1,000 rows."""
    data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    server = subprocess.Popen([sys.executable, str(HERE / "s3_serve.py")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        endpoint = server.stdout.readline().strip()  # type: ignore[union-attr]
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket="bench-storage")
        with SimProcess(latency_ms=0) as sim:
            local = run_scenario("storage_client.py", sim.base_url, str(data), "local")
            remote = run_scenario("storage_client.py", sim.base_url, str(data), "s3", endpoint, "bench-storage")
        server.stdin.write("counts\n")  # type: ignore[union-attr]
        server.stdin.flush()  # type: ignore[union-attr]
        counts = json.loads(server.stdout.readline())  # type: ignore[union-attr]
    finally:
        server.kill()
    name = f"17. data in a bucket ({n:,} rows, C=64)"
    puts = counts.get("PUT", 0) - 2  # the bucket, and the input's upload
    return [
        (name, "rows a second, input and output on the loopback S3 server",
         f"**{remote['rows_per_s']:.0f}** = **{remote['rows_per_s'] / local['rows_per_s']:.2f}x** local ({local['rows_per_s']:.0f})",
         "local paths, same run", ""),
        (name, "the client's peak memory", f"**{remote['peak_rss_mb']:.0f} MB** (local {local['peak_rss_mb']:.0f} MB)", "local paths", ""),
        (name, "objects written per 1,000 rows", f"**{puts / n * 1000:.2f}** PUTs ({puts} in all, the lock's heartbeats "
         f"included; {remote['objects']} objects at the end); GETs {counts.get('GET', 0)}, HEADs {counts.get('HEAD', 0)}",
         "", ""),
    ]


def ray_storage(n: int, concurrency: int) -> list[Row]:
    """Scenario 12 with the input and output in a bucket on the loopback S3 server (moto, in its
    own process): streams a second with 1, 2 and 4 actors, the input object's GETs against the
    blocks it was cut into (each block read once), the driver's peak memory."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return [("18. Ray, data in a bucket", "", "not measured: Ray is not installed", "", "")]
    data = write_prompts(WORK / f"prompts_{n}.jsonl", n)
    server = subprocess.Popen([sys.executable, str(HERE / "s3_serve.py")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def counts() -> dict[str, int]:
        server.stdin.write("counts\n")  # type: ignore[union-attr]
        server.stdin.flush()  # type: ignore[union-attr]
        return json.loads(server.stdout.readline())  # type: ignore[union-attr]

    out: list[Row] = []
    try:
        endpoint = server.stdout.readline().strip()  # type: ignore[union-attr]
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket="bench-ray")
        blocks = -(-n // 64)
        with SimProcess(tokens_per_s=50.0, reasoning_words=60, answer_words=30) as sim:
            for actors in (1, 2, 4):
                sim.reset()
                before = counts()
                r = run_scenario("ray_client.py", sim.base_url, str(data), str(WORK / "out_ray"), str(concurrency),
                                 str(actors), endpoint, "bench-ray")
                after = counts()
                st = sim.stats()
                rate = (st["admitted"] - 1) / (st["admitted_last_s"] - st["admitted_first_s"])
                name = f"/data/{data.name}"
                gets = after["gets"].get(f"/bench-ray{name}", 0) - before["gets"].get(f"/bench-ray{name}", 0)
                out.append((f"18. Ray, data in a bucket ({n:,} paced thinking streams, C={concurrency})",
                            f"{actors} actor{'s' if actors > 1 else ''}",
                            f"**{rate:.0f} streams/s**; the input object read {gets} times for {blocks} blocks (once "
                            f"whole by the driver, then once a block); driver peak {r['driver_peak_rss_mb']:.0f} MB",
                            "scenario 12 (local paths)", ""))
    finally:
        server.kill()
    return out


def startup(repeats: int = 9) -> list[Row]:
    """The command line's start: `batchkimi --help` and `--version` against `python -c pass` (the
    interpreter's own start), median of ``repeats`` runs each, interleaved."""
    import shutil
    import subprocess

    exe = shutil.which("batchkimi") or ""
    cmds = {"python -c pass": [sys.executable, "-c", "pass"], "batchkimi --help": [exe, "--help"],
            "batchkimi --version": [exe, "--version"]}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    rows: list[Row] = []
    for name in ("batchkimi --help", "batchkimi --version"):
        med = statistics.median(times[name])
        rows.append(("15. start-up", f"`{name}`, median of {repeats}", f"**{med:.3f} s** ({med / base:.2f}x `python -c pass`, "
                     f"{base:.3f} s)", "target < 0.15 s", verdict(med < 0.15)))
    return rows


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
    ap.add_argument("--only", default="overhead,loops,tls,waiting,chunks,streams,memory,media,scoring,resume,overload,"
                    "paced,budget,budget-long,startup,rate,long,ray,storage,ray-storage")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each speed figure (default 3; --quick 2)")
    ap.add_argument("--rate-repeats", type=int, default=None, help="runs of each rate-accuracy scenario (default 5; --quick 1)")
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    q = args.quick
    global REPEATS
    REPEATS = args.repeats or (2 if q else 3)
    rate_repeats = args.rate_repeats or (1 if q else 5)
    plan = {
        "overhead": lambda: overhead(5000 if q else 20000),
        "waiting": lambda: waiting(4000 if q else 16000, 1000 if q else 2000, 5.0),
        "chunks": lambda: stream_chunks(400 if q else 1000, 200 if q else 500),
        "streams": lambda: stream_scale([1000] if q else [2000, 5000], 20.0),
        "memory": lambda: memory(10_000, 200_000 if q else 1_000_000),
        "loops": lambda: loops(5000 if q else 20000),
        "tls": lambda: loops(2000 if q else 5000, tls=True),
        "media": lambda: media(1000, 10_000),
        "scoring": lambda: scoring(100_000, 1_000_000),
        "resume": lambda: resume(201_000 if q else 1_001_000),
        "overload": lambda: overload(5000 if q else 5000, 200, 0.3, 0.005),
        "rate": lambda: rate(90 if q else 180, rate_repeats),
        "long": lambda: long_outputs(240, 200_000),
        "long-steady": lambda: long_outputs_steady(1800, 600, 200_000),
        "ray": lambda: ray_scaling(1000 if q else 3000, 300),
        "paced": lambda: paced_429s(1000, 59, 50, 0.25),
        "startup": lambda: startup(),
        "budget": lambda: budget_use(2000, [0.2, 2.0, 10.0] if q else [0.2, 2.0, 10.0, 25.0], 32768, 32, 2500),
        "budget-long": lambda: budget_use(2000, [0.2, 2.0, 10.0], 32768, 32, 0, kimi_shape=True),
        "storage": lambda: storage(20_000 if q else 100_000),
        "ray-storage": lambda: ray_storage(1000 if q else 3000, 300),
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
        f"the smaller, fresh or fault-free run). Speed figures: the median of {REPEATS} runs, with the range.", "",
        "| scenario | figure | result | baseline / target | |", "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows], "",
    ]
    text = "\n".join(lines)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
