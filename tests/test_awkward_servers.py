"""Servers that answer in the variants found in the wild (tokenhub-api.md): real HTTP on
loopback with bytes the test chooses. Every variant must give the whole answer or an error
row, never half an answer marked ok."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses

import batchkimi
from batchkimi.errors import ResponseError, TransportError
from batchkimi.http.transport import Timeouts, Transport

from .conftest import chunk, fast_job, sse, write_jsonl

USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "cached_tokens": 3}


def one_row(tmp_path: Path, base_url: str, **kw) -> dict:  # noqa: ANN003
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    batchkimi.run(fast_job(tmp_path, base_url, input=str(data), **kw))
    return batchkimi.read_results(tmp_path / "out").iloc[0].to_dict()


def streaming(raw: bytes, status: int = 200, ctype: str = "text/event-stream"):  # noqa: ANN201
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"Content-Type": ctype})
        await resp.prepare(request)
        for i in range(0, len(raw), 50):  # dribble it out in small writes
            await resp.write(raw[i : i + 50])
        return resp

    return handler


BASE = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Let me think."}), chunk({"content": "Hello"}),
        chunk({"content": " there"}), chunk({}, "stop", USAGE)]

VARIANTS = [
    pytest.param(sse(*BASE), id="kimi-default"),
    pytest.param(sse(*BASE, prefix=b"data:"), id="data-without-space"),
    pytest.param(sse(*BASE, sep=b"\r\n\r\n"), id="crlf"),
    pytest.param(b": ping\n\n" + sse(*BASE).replace(b"\n\ndata", b"\n\n: keep-alive\n\ndata"), id="comment-lines"),
    pytest.param(sse(*[{**c, "usage": None} for c in BASE[:-1]], {**chunk({}, "stop"), "usage": None}, {"id": "x", "choices": [], "usage": USAGE}), id="include-usage-chunk"),
    pytest.param(sse(*BASE[:-1], {**chunk({}, "stop"), "usage": USAGE}), id="top-level-usage"),
    pytest.param(sse(*BASE[:-1], chunk({}, "stop", {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 3}})), id="cached-in-details"),
]


@pytest.mark.parametrize("raw", VARIANTS)
def test_stream_variants_give_the_whole_answer(tmp_path: Path, raw_server, raw: bytes) -> None:
    srv = raw_server(streaming(raw))
    row = one_row(tmp_path, srv.base_url)
    assert (row["status"], row["content"], row["reasoning_content"]) == ("ok", "Hello there", "Let me think.")
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (7, 5, 3)


def test_a_single_sse_line_over_128_kib(tmp_path: Path, raw_server) -> None:
    big = "z" * 300_000
    srv = raw_server(streaming(sse(chunk({"content": big}), chunk({}, "stop", USAGE))))
    row = one_row(tmp_path, srv.base_url)
    assert row["status"] == "ok" and row["content"] == big


def test_sse_answer_to_a_non_streaming_request_is_read_as_a_stream(tmp_path: Path, raw_server) -> None:
    srv = raw_server(streaming(sse(*BASE)))
    row = one_row(tmp_path, srv.base_url, stream=False)
    assert row["status"] == "ok" and row["content"] == "Hello there"


class Flaky:
    """Fails the first ``fails`` requests one way, then answers properly."""

    def __init__(self, fails: int, bad) -> None:  # noqa: ANN001
        self.fails, self.bad, self.calls = fails, bad, []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.fails:
            return await self.bad(request)
        return await streaming(sse(*BASE))(request)


async def cut_mid_reasoning(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(sse(chunk({"reasoning_content": "half a thou"}), done=False))
    request.transport.abort()  # type: ignore[union-attr]
    return resp


async def stall(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(sse(chunk({"content": "He"}), done=False))
    await asyncio.sleep(30)
    return resp


async def ends_without_done(request: web.Request) -> web.StreamResponse:
    return await streaming(sse(*BASE, done=False))(request)


async def slow_first_byte(request: web.Request) -> web.Response:
    await asyncio.sleep(30)
    return web.Response(text="late")


async def garbage_200(request: web.Request) -> web.Response:
    return web.Response(text='{"id": "x", "choi', content_type="application/json")


async def html_502(request: web.Request) -> web.Response:
    return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1>nginx</body></html>", content_type="text/html")


async def error_event(request: web.Request) -> web.StreamResponse:
    return await streaming(sse(chunk({"content": "par"}), {"error": {"message": "upstream failed", "type": "server_error"}}, done=False))(request)


RECOVERIES = [
    pytest.param(cut_mid_reasoning, "stream_cut", id="cut-mid-stream"),
    pytest.param(stall, "stream_stalled", id="stall"),
    pytest.param(ends_without_done, "stream_cut", id="no-done"),
    pytest.param(slow_first_byte, "first_byte_timeout", id="slow-first-byte"),
    pytest.param(garbage_200, "bad_response", id="truncated-json-200"),
    pytest.param(html_502, "http_error", id="html-502"),
    pytest.param(error_event, "server_error", id="error-event-in-200-stream"),
]


@pytest.mark.parametrize("bad,error_type", RECOVERIES)
def test_broken_attempts_are_retried_then_answer(tmp_path: Path, raw_server, bad, error_type: str) -> None:  # noqa: ANN001
    srv = raw_server(Flaky(1, bad))
    row = one_row(tmp_path, srv.base_url, idle_timeout_s=0.5, first_byte_timeout_s=0.5)
    assert (row["status"], row["content"], row["attempts"]) == ("ok", "Hello there", 2)


@pytest.mark.parametrize("bad,error_type", RECOVERIES)
def test_broken_attempts_that_never_recover_become_error_rows(tmp_path: Path, raw_server, bad, error_type: str) -> None:  # noqa: ANN001
    """Never half an answer marked ok: the row says what went wrong."""
    srv = raw_server(Flaky(99, bad))
    row = one_row(tmp_path, srv.base_url, idle_timeout_s=0.5, first_byte_timeout_s=0.5, max_attempts=2)
    assert (row["status"], row["error_type"], row["attempts"]) == ("error", error_type, 2)
    assert row["content"] is None or row["content"] != row["content"]  # None or NaN


def test_retry_after_is_honoured(tmp_path: Path, raw_server) -> None:
    async def limited(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "1"}, content_type="application/json",
                            text=json.dumps({"error": {"type": "rate_limit_error", "code": "429001", "message": "rate limit exceeded on dimension: rpm"}}))

    flaky = Flaky(1, limited)
    srv = raw_server(flaky)
    row = one_row(tmp_path, srv.base_url)
    assert row["status"] == "ok" and row["attempts"] == 2
    assert flaky.calls[1] - flaky.calls[0] >= 0.9


def test_x_ratelimit_remaining_zero_pauses(tmp_path: Path, raw_server) -> None:
    calls: list[float] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(time.monotonic())
        resp = await streaming(sse(*BASE))(request)
        return resp

    async def with_headers(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        body = {"id": "x", "model": "kimi-k2.6", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}], "usage": USAGE}
        return web.Response(text=json.dumps(body), content_type="application/json",
                            headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"})

    srv = raw_server(with_headers)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": "hi"}])
    batchkimi.run(fast_job(tmp_path, srv.base_url, input=str(data), concurrency=1, stream=False))
    assert calls[1] - calls[0] >= 0.9


@pytest.mark.parametrize(
    "exc,error_type",
    [
        pytest.param(aiohttp.ServerDisconnectedError(), "connection_error", id="disconnected"),
        pytest.param(aiohttp.ClientOSError(104, "Connection reset by peer"), "connection_error", id="reset"),
        pytest.param(aiohttp.ClientPayloadError("cut"), "stream_cut", id="payload"),
    ],
)
def test_transport_translates_aiohttp_errors_into_retryable_transport_errors(exc: Exception, error_type: str) -> None:
    async def go() -> None:
        with aioresponses() as mocked:
            mocked.post("http://tokenhub.test/v1/chat/completions", exception=exc)
            async with Transport("http://tokenhub.test/v1", "sk-x", Timeouts()) as t:
                await t.complete({"model": "kimi-k2.6", "messages": []}, stream=False)

    with pytest.raises((TransportError, ResponseError)) as info:
        asyncio.run(go())
    assert info.value.error_type == error_type and info.value.retryable


def test_connection_refused_is_retryable_and_ends_as_error_row(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = s.getsockname()[1]
        row = one_row(tmp_path, f"http://127.0.0.1:{port}/v1", max_attempts=2, stop_after_failures=0)
    assert (row["status"], row["error_type"], row["attempts"]) == ("error", "connect_error", 2)


@pytest.mark.parametrize("ctype", ["text/plain", "application/json", "application/octet-stream", ""])
@pytest.mark.parametrize("stream", [True, False], ids=["stream-asked", "plain-asked"])
def test_an_sse_stream_under_another_content_type_is_read_as_a_stream(tmp_path: Path, raw_server, ctype: str, stream: bool) -> None:
    """Proxies label streams text/plain, application/json or nothing: the bytes decide, and the answer is whole."""
    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(body=sse(*BASE))
        resp.headers["Content-Type"] = ctype
        if not ctype:
            del resp.headers["Content-Type"]
        return resp

    srv = raw_server(handler)
    row = one_row(tmp_path, srv.base_url, stream=stream)
    assert (row["status"], row["content"], row["reasoning_content"], row["total_tokens"]) == ("ok", "Hello there", "Let me think.", 12)


def test_a_half_stream_under_another_content_type_is_still_no_answer(tmp_path: Path, raw_server) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=sse(*BASE, done=False), content_type="text/plain")

    row = one_row(tmp_path, raw_server(handler).base_url, max_attempts=2)
    assert (row["status"], row["error_type"]) == ("error", "stream_cut")


def test_a_short_placeholder_key_is_not_redacted_out_of_answers(tmp_path: Path, raw_server, monkeypatch) -> None:
    """vLLM users pass api_key EMPTY or dummy: no secret, and the word must survive in answers."""
    monkeypatch.setenv("TOKENHUB_API_KEY", "dummy")
    body = {"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "a dummy variable holds tokens"}}], "usage": USAGE}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body)

    row = one_row(tmp_path, raw_server(handler).base_url, stream=False, model="gpt-x")
    assert row["content"] == "a dummy variable holds tokens"
