"""Shared fixtures: servers on 127.0.0.1:0 in their own threads (the engine runs its own
event loop, so a server cannot share the test's), and small dataset writers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchkimi.config import Job
from batchkimi.simulator import SimHandle, serve_app_in_thread, start_in_thread

TEST_KEY = "sk-test-0123456789abcdef-SECRET"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENHUB_API_KEY", TEST_KEY)
    monkeypatch.delenv("BATCHKIMI_BASE_URL", raising=False)


@pytest.fixture
def simulator() -> Iterator[Callable[..., SimHandle]]:
    """start(**settings) -> a running simulator; every one is stopped after the test."""
    handles: list[SimHandle] = []

    def start(**settings: Any) -> SimHandle:
        # short, instant answers unless a test asks for Kimi's shape (shape="kimi")
        settings.setdefault("shape", "short")
        h = start_in_thread(settings)
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.stop()


class RawServer:
    """An aiohttp server whose handler the test writes: real HTTP, bytes chosen by the test."""

    def __init__(self, handler: Callable[[web.Request], Any]) -> None:
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self.server = serve_app_in_thread(app, name="test-raw-server")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"headers": dict(request.headers), "body": json.loads(body) if body else None})
        return await self.handler(request)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[web.Request], Any]], RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Callable[[web.Request], Any]) -> RawServer:
        s = RawServer(handler)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def fast_job(tmp_path: Path, base_url: str, **kw: Any) -> Job:
    """A job tuned for tests: tiny backoffs, quick flushes."""
    defaults: dict[str, Any] = dict(
        output=str(tmp_path / "out"),
        base_url=base_url,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        concurrency=8,
        idle_timeout_s=2.0,
        first_byte_timeout_s=5.0,
        attempt_timeout_s=20.0,
        grace_s=2.0,
    )
    defaults.update(kw)
    return Job(**defaults)


def sse(*events: Any, done: bool = True, sep: bytes = b"\n\n", prefix: bytes = b"data: ") -> bytes:
    out = b""
    for e in events:
        out += prefix + (e if isinstance(e, bytes) else json.dumps(e).encode()) + sep
    if done:
        out += prefix + b"[DONE]" + sep
    return out


def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    if usage is not None:
        choice["usage"] = usage
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "kimi-k2.6", "choices": [choice], **top}


def json_reply(body: Any, status: int = 200) -> Callable[[web.Request], Any]:
    """A handler answering every request with ``body`` as JSON."""
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")

    return handler


def stream_reply(raw: bytes) -> Callable[[web.Request], Any]:
    """A handler answering every request with the SSE bytes ``raw``."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(raw)
        return resp

    return handler
from .s3_server import s3, s3_server  # noqa: E402,F401 - fixtures: a loopback S3 server and a fresh bucket
