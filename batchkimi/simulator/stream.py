"""A simulated answer as an SSE stream, as Kimi streams it: the role chunk, reasoning, content,
tool-call deltas keyed by ``index``, the finish chunk with ``choices[0].usage``, an optional
``include_usage`` chunk, ``[DONE]``; paced, or cut on purpose by a fault."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from .stats import count


async def stream(sim: Any, request: web.Request, key: str, rid: str, cid: str, model: str, reasoning: str, content: str,
                  tool_calls: list[dict[str, Any]] | None, finish: str, usage: dict[str, Any],
                  include_usage: bool, fault: str | None) -> web.StreamResponse:
    sim.stats["streams"] += 1
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": rid}
    base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, choice_usage: dict[str, Any] | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        if choice_usage is not None:
            choice["usage"] = choice_usage
        return b"data: " + orjson.dumps({**base, "choices": [choice], **extra, "system_fingerprint": "fpv0_sim00001"}) + b"\n\n"

    n = max(1, sim.cfg.chunk_tokens)
    events: list[tuple[bytes, int]] = [(chunk({"role": "assistant", "content": ""}), 0)]
    for piece in pieces(reasoning, n):
        events.append((chunk({"reasoning_content": piece}), n))
    for piece in pieces(content, n) if fault != "long" else [content]:
        events.append((chunk({"content": piece}), n))
    for i, call in enumerate(tool_calls or []):
        events.append((chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                              "function": {"name": call["function"]["name"], "arguments": ""}}]}), 1))
        for piece in pieces(call["function"]["arguments"], n * 4):
            events.append((chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}), n))
    events.append((chunk({}, finish, usage), 0))
    if include_usage:
        events.append((b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n", 0))
    events.append((b"data: [DONE]\n\n", 0))
    sim.stats["chunks"] += len(events)

    if fault == "nodone":
        events.pop()  # a clean end of the body, but no [DONE]
    cut_at = len(events) // 2 if fault in ("cut", "stall", "error_event") else None
    if sim.cfg.latency_ms:
        await asyncio.sleep(sim.cfg.wait_s(sim.cfg.latency_ms))
    pace = sim.cfg.pace
    if not pace and cut_at is None:
        # Unpaced: the same SSE bytes in one response (one send, not three).
        count(sim.stats, 200, key)
        return web.Response(body=b"".join(e for e, _ in events), headers=headers)
    resp = web.StreamResponse(status=200, headers=headers)
    try:
        complete = await send_events(sim, request, resp, events, cut_at, fault, pace)
    except ConnectionResetError:
        # the client went away mid-stream: normal under faults and stops, not a server error
        sim.stats["client_disconnects"] += 1
        return resp
    if complete:
        count(sim.stats, 200, key)
    return resp

async def send_events(sim: Any, request: web.Request, resp: web.StreamResponse, events: list[tuple[bytes, int]],
                       cut_at: int | None, fault: str | None, pace: float) -> bool:
    """Write the events; False when the fault cut the stream on purpose."""
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    due = loop.time()  # when the tokens sent so far are due at the pace: sleeps are taken in
    # steps of a few milliseconds (the event loop's timers are no finer), the rate kept on average
    for i, (event, tokens) in enumerate(events):
        if i == cut_at:
            if fault == "stall":
                await asyncio.sleep(sim.cfg.stall_s)
            elif fault == "error_event":
                err = {"error": {"type": "server_error", "message": "upstream stream failed", "code": "502001"}}
                await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
            abort(request)
            return False
        await resp.write(event)
        if pace and tokens:
            due += tokens / pace
            ahead = due - loop.time()
            if ahead > 0.004:
                await asyncio.sleep(ahead)
    return True


def pieces(text: str, tokens_per_piece: int) -> list[str]:
    if not text:
        return []
    size = max(1, tokens_per_piece * 4)
    return [text[i : i + size] for i in range(0, len(text), size)]


def clip_tokens(text: str, tokens: int) -> str:
    return text[: max(0, tokens) * 4]


def abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
