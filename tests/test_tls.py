"""Over HTTPS: the simulator serves TLS with a test CA (trustme), a real run goes through it,
connections are reused (handshakes stay at the concurrency, not the row count), and a
certificate nobody trusts stops the job at once, saying what to set."""

from __future__ import annotations

from pathlib import Path

import pytest

import batchkimi

from .conftest import fast_job, write_jsonl

pytest.importorskip("trustme", reason="trustme is not installed (pip install -e '.[test]')")


def rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"What is {i} + 2? Reply with the number."} for i in range(n)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_run_over_https_reuses_its_connections(tmp_path: Path, simulator, stream: bool) -> None:
    h = simulator(tls=True, latency_ms=20)
    assert h.base_url.startswith("https://") and h.ca_pem
    ca = tmp_path / "ca.pem"
    ca.write_bytes(h.ca_pem)
    data = write_jsonl(tmp_path / "in.jsonl", rows(120))
    job = fast_job(tmp_path, h.base_url, input=str(data), ca_file=str(ca), concurrency=6, thinking="disabled",
                   stream=stream, max_tokens=64)
    summary = batchkimi.run(job)
    assert summary.final_status == {"ok": 120}
    stats = h.simulator.stats_json()
    assert stats["requests"] == 120 and stats["connections"] <= 6  # one TLS handshake per connection, not per row
    assert stats["streams"] == (120 if stream else 0)


def test_the_in_process_simulator_can_serve_tls(tmp_path: Path) -> None:
    import asyncio

    from batchkimi.api import RowEngine
    from batchkimi.request import build_request

    job = fast_job(tmp_path, "simulator", simulator={"tls": True, "shape": "short"}, thinking="disabled", stream=False,
                   max_tokens=64)

    async def one() -> tuple[str, dict]:
        async with RowEngine.create(job, "sim-local-key") as engine:
            return engine.transport.url, await engine.process("r0", 0, build_request({"prompt": "hi"}, job))

    url, row = asyncio.run(one())
    assert url.startswith("https://127.0.0.1:") and row["status"] == "ok"  # over TLS, its CA trusted by itself


def test_an_untrusted_certificate_stops_the_job_at_once_and_says_what_to_set(tmp_path: Path, simulator) -> None:
    h = simulator(tls=True)
    data = write_jsonl(tmp_path / "in.jsonl", rows(50))
    job = fast_job(tmp_path, h.base_url, input=str(data), thinking="disabled", stream=False, max_tokens=64)
    summary = batchkimi.run(job)
    assert summary.fatal and "not trusted" in summary.fatal and "ca_file" in summary.fatal
    assert summary.exit_code == 1 and h.simulator.stats_json()["requests"] == 0
    assert summary.requests <= job.concurrency  # no retry storm: the first failures end it


def test_the_modelled_network_charges_handshakes_to_new_connections_only(tmp_path: Path, simulator) -> None:
    """rtt_ms: a connection's first request waits one round trip plus two for the TCP and TLS
    handshakes, a reused connection's requests one: a client that reconnects pays every time."""
    import asyncio
    import ssl
    import time

    import aiohttp

    h = simulator(tls=True, rtt_ms=60)
    ctx = ssl.create_default_context(cadata=h.ca_pem.decode())
    body = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "disabled"}}

    async def timed(session: aiohttp.ClientSession) -> float:
        t0 = time.perf_counter()
        async with session.post(h.base_url + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-x"}) as r:
            assert r.status == 200
            await r.read()
        return time.perf_counter() - t0

    async def main() -> tuple[float, float, float]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            first, reused = await timed(s), await timed(s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as s:
            await timed(s)
            reconnected = await timed(s)
        return first, reused, reconnected

    first, reused, reconnected = asyncio.run(main())
    assert first >= 0.18 and reconnected >= 0.18  # 3 round trips of 60 ms
    assert 0.06 <= reused < 0.17  # 1 round trip
    assert h.simulator.stats_json()["connections"] == 3
