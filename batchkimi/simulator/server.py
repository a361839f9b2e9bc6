"""A TokenHub simulator for Kimi: ``POST /v1/chat/completions``, ``GET /v1/models``,
``POST /v1/tokenizers/estimate-token-count`` (Moonshot's; TokenHub does not document it),
``GET /stats``, ``POST /stats/reset``. Faithful to what ``docs/kimi-api.md`` describes.

Per-request behaviour can be picked with a marker anywhere in the messages,
``[[sim:NAME]]``, or the header ``X-Sim-Fault: NAME``; ``[[sim:NAME*N]]`` applies it to the
first N attempts of that same request only, then answers normally. Names::

    500 502 503 504     that status (502 in TokenHub's upstream envelope)
    html                502 with a gateway's HTML page
    429 overload        a rate-limit 429 / an engine_overloaded 429 without Retry-After
    400 401 402 403 451 bad request / auth / quota exhausted / permission / content filter
    quota suspended     Moonshot's 429 exceeded_current_quota_error (token quota / account suspended)
    content_filter      Moonshot's 400 content_filter ("considered high risk")
    tpd                 a 429 for the tokens-per-day limit, Retry-After ``tpd_retry_after_s`` (1152 s)
    too_long            400 "Input token length too long"
    cut                 the stream (or body) stops mid-way, no [DONE]: the connection is dropped
    nodone              the stream ends cleanly after the finish chunk, but without [DONE]
    stall               the stream stops sending (for stall_s seconds)
    slow                the first byte waits slow_first_byte_s
    error_event         a data: {"error": ...} event inside the 200 stream
    length              all tokens go to reasoning: finish_reason "length", empty content
    bad_args            tool-call arguments that break the tool's schema
    long                a content delta of long_line_bytes bytes on one SSE line
    parallel_tools      one call to every offered tool, in one answer
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
import uuid
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import web

from ..tokens import estimate_messages_tokens, estimate_text_tokens
from .answers import answer, text_of
from .limits import KeyLimits
from .validate import CONTEXT, MODELS, SimError, invalid, validate

_MARKER = re.compile(r"\[\[sim:([a-z0-9_]+)(?:\*(\d+))?\]\]")
FAULTS = ("500", "502", "503", "504", "html", "429", "overload", "400", "401", "402", "403", "451",
          "quota", "suspended", "content_filter", "tpd", "too_long",
          "cut", "nodone", "stall", "slow", "error_event", "length", "bad_args", "long", "parallel_tools")
_ERROR_FAULTS = frozenset({"500", "502", "503", "504", "html", "429", "overload", "400", "401", "402", "403", "451",
                           "quota", "suspended", "content_filter", "tpd", "too_long"})
log = logging.getLogger("batchkimi.simulator")


@dataclass
class SimConfig:
    """Every simulator setting; the job's ``[simulator]`` table and ``batchkimi simulate`` flags."""

    host: str = "127.0.0.1"
    port: int = 0
    tls: bool = False  # serve HTTPS with a certificate from a fresh test CA (trustme)
    api_keys: tuple[str, ...] | None = None  # None: any non-empty key
    key_models: dict[str, list[str]] = field(default_factory=dict)  # key -> allowed models (403 else)
    seed: int = 0
    error_style: str = "tokenhub"  # tokenhub | moonshot
    unknown_model_status: int = 404  # 404 (Moonshot) or 400 (TokenHub)
    endpoints: dict[str, str] = field(default_factory=dict)  # TokenHub endpoint id (ep-...) -> the model it serves
    latency_ms: float = 0.0  # non-streaming: time to the answer; streaming: time to first chunk
    # A modelled network between client and simulator (loopback has none): each request waits one
    # round trip more, and a connection's first request the handshakes' too (TCP's, and TLS 1.3's
    # with tls): a client that does not reuse connections pays them on every request, as it would
    # over the internet.
    rtt_ms: float = 0.0
    tokens_per_s: float = 0.0  # streaming pace; 0 = as fast as possible
    chunk_tokens: int = 4
    reasoning_words: int = 40
    answer_words: int = 30
    accuracy: float = 0.9
    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    window_s: float = 60.0  # the span rpm and tpm are counted over
    retry_after: str = "seconds"  # seconds | date | none
    rate_limit_style: str = "tokenhub"  # tokenhub | moonshot ("please try again after N seconds")
    fail_rate: float = 0.0
    fail_faults: tuple[str, ...] = ("500", "502", "503", "504", "overload", "cut")
    overload_rate: float = 0.0
    bad_tool_args_rate: float = 0.0
    stall_s: float = 3600.0
    slow_first_byte_s: float = 30.0
    long_line_bytes: int = 200_000
    max_body_bytes: int = 100 * 1024 * 1024
    body_too_large_status: int = 413
    cache_prefixes: bool = True
    tpd_retry_after_s: float = 1152.0  # the Retry-After Moonshot sent with a real TPD 429
    estimate_endpoint: bool = True  # POST /v1/tokenizers/estimate-token-count (Moonshot's)
    models_endpoint: bool = True  # GET /v1/models

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> SimConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown simulator settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        values = dict(values)
        for key in ("api_keys", "fail_faults"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        bad = set(values.get("fail_faults", ())) - set(FAULTS)
        if bad:
            raise ValueError(f"unknown simulator faults: {', '.join(sorted(bad))}")
        return cls(**values)


class Simulator:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.cfg = config or SimConfig()
        self.limits = KeyLimits(self.cfg.rpm, self.cfg.tpm, self.cfg.concurrency, window_s=self.cfg.window_s)
        self.rng = random.Random(self.cfg.seed)
        self.attempts: Counter[str] = Counter()  # request hash -> attempts seen (for NAME*N)
        self.prefix_cache: dict[str, dict[bytes, int]] = defaultdict(dict)
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self.reset_stats()

    # ---- stats -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.started = time.monotonic()
        self.stats: dict[str, Any] = {
            "requests": 0, "by_status": Counter(), "by_error": Counter(), "in_flight": 0, "peak_in_flight": 0,
            "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "streams": 0, "chunks": 0,
            "connections": 0, "client_disconnects": 0,
            "body_bytes": 0, "body_bytes_in_flight": 0, "peak_body_bytes_in_flight": 0,
            "images": 0, "videos": 0, "media_urls": 0,
            "admitted": 0, "admitted_first_s": None, "admitted_last_s": None,
            "per_key": defaultdict(lambda: {"requests": 0, "ok": 0, "rate_limited": 0, "tokens": 0}),
            "admitted_per_s": Counter(), "tokens_per_s": Counter(),
        }

    def stats_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "requests": s["requests"], "by_status": {str(k): v for k, v in s["by_status"].items()},
            "by_error": dict(s["by_error"]), "in_flight": s["in_flight"], "peak_in_flight": s["peak_in_flight"],
            "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
            "cached_tokens": s["cached_tokens"], "streams": s["streams"], "chunks": s["chunks"],
            "connections": s["connections"], "client_disconnects": s["client_disconnects"],
            "body_bytes": s["body_bytes"], "peak_body_bytes_in_flight": s["peak_body_bytes_in_flight"],
            "images": s["images"], "videos": s["videos"], "media_urls": s["media_urls"],
            "admitted": s["admitted"], "admitted_first_s": s["admitted_first_s"], "admitted_last_s": s["admitted_last_s"],
            "per_key": {_mask(k): v for k, v in s["per_key"].items()},
            "admitted_per_s": {str(k): v for k, v in sorted(s["admitted_per_s"].items())},
            "tokens_per_s": {str(k): v for k, v in sorted(s["tokens_per_s"].items())},
            "uptime_s": round(time.monotonic() - self.started, 3),
        }

    def _count(self, status: int, key: str | None, etype: str | None = None) -> None:
        self.stats["by_status"][status] += 1
        if etype:
            self.stats["by_error"][etype] += 1
        if key is not None:
            pk = self.stats["per_key"][key]
            if status == 200:
                pk["ok"] += 1
            elif status == 429:
                pk["rate_limited"] += 1

    # ---- errors ------------------------------------------------------------------------
    def error_response(self, err: SimError, request_id: str) -> web.Response:
        headers = {"x-request-id": request_id}
        if err.retry_after_s is not None and self.cfg.retry_after != "none":
            if self.cfg.retry_after == "date":
                headers["Retry-After"] = formatdate(time.time() + err.retry_after_s, usegmt=True)
            else:
                headers["Retry-After"] = str(int(err.retry_after_s))
        if err.html:
            page = f"<html><head><title>{err.status} Bad Gateway</title></head><body><center><h1>{err.status} Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
            return web.Response(status=err.status, text=page, content_type="text/html", headers=headers)
        if self.cfg.error_style == "moonshot":
            body: dict[str, Any] = {"error": {"message": err.message, "type": err.etype}}
        else:
            e: dict[str, Any] = {"type": err.etype, "code": err.code or err.etype, "message": err.message, "source": err.source}
            if err.upstream:
                # Moonshot's error passed through: its type and status kept as upstream_*.
                e.update(source="upstream", upstream_code=err.upstream_code or err.etype,
                         upstream_status=err.upstream_status or err.status)
            e["request_id"] = request_id
            body = {"error": e}
        return web.Response(status=err.status, body=orjson.dumps(body), content_type="application/json", headers=headers)

    def rate_limit_error(self, dimension: str, retry_after_s: float, limit: int) -> SimError:
        if self.cfg.rate_limit_style == "moonshot":
            what = {"rpm": f"max RPM: {limit}", "tpm": f"TPM rate limit, current:{limit}, limit:{limit}",
                    "concurrency": f"max concurrency: {limit}"}[dimension]
            msg = f"Your account org-sim<ak-sim> request reached organization {what}, please try again after {int(retry_after_s)} seconds"
            return SimError(429, "rate_limit_reached_error", msg, retry_after_s=retry_after_s)
        return SimError(429, "rate_limit_error", f"rate limit exceeded on dimension: {dimension}", code="429001", retry_after_s=retry_after_s)

    # ---- the handler ---------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        self.stats["requests"] += 1
        conn = request.transport
        trips = 1
        if conn is not None and conn not in self._connections:
            self._connections.add(conn)
            self.stats["connections"] += 1
            trips += 2 if self.cfg.tls else 1
        if self.cfg.rtt_ms:
            await asyncio.sleep(self.cfg.rtt_ms * trips / 1000)
        key: str | None = None
        admitted = False
        completion_tokens = 0
        body_bytes = 0
        try:
            key = self._auth(request)
            self.stats["per_key"][key]["requests"] += 1
            raw = await request.read()
            body_bytes = len(raw)
            s = self.stats
            s["body_bytes"] += body_bytes
            s["body_bytes_in_flight"] += body_bytes
            s["peak_body_bytes_in_flight"] = max(s["peak_body_bytes_in_flight"], s["body_bytes_in_flight"])
            if len(raw) > self.cfg.max_body_bytes:
                raise SimError(self.cfg.body_too_large_status, "invalid_request_error",
                               f"Invalid request: request body of {len(raw)} bytes exceeds the 100 MB limit", code="400004")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise SimError(400, "invalid_request_error", "Invalid request: the body is not valid JSON", code="400001") from None
            if not isinstance(body, dict):
                raise SimError(400, "invalid_request_error", "Invalid request: the body must be a JSON object", code="400001")
            req = validate(body, self.cfg.key_models.get(key), self.cfg.unknown_model_status, self.cfg.endpoints)
            model, thinking, max_tokens = req.model, req.thinking, req.max_tokens
            for seen in req.media:
                self.stats["media_urls" if seen.mime is None else f"{seen.kind}s"] += 1
            prompt_tokens = req.prompt_tokens
            if prompt_tokens + max_tokens > CONTEXT:
                raise invalid(f"Your request exceeded model token limit : {CONTEXT}")
            fault = self._fault(body, request)
            if fault in _ERROR_FAULTS:
                raise self._fault_error(fault)
            limited = self.limits.admit(key, prompt_tokens)
            if limited is not None:
                dim, after = limited
                raise self.rate_limit_error(dim, after, {"rpm": self.cfg.rpm, "tpm": self.cfg.tpm, "concurrency": self.cfg.concurrency}[dim])
            admitted = True
            self.stats["in_flight"] += 1
            self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], self.stats["in_flight"])
            since = time.monotonic() - self.started
            self.stats["admitted_per_s"][int(since)] += 1
            self.stats["admitted"] += 1
            if self.stats["admitted_first_s"] is None:
                self.stats["admitted_first_s"] = since
            self.stats["admitted_last_s"] = since
            if fault is None and self.cfg.overload_rate and self.rng.random() < self.cfg.overload_rate:
                raise self._fault_error("overload")
            if fault == "slow":
                await asyncio.sleep(self.cfg.slow_first_byte_s)
            cached = self._cached(key, body["messages"]) if self.cfg.cache_prefixes else 0
            reply = answer(
                req.light_messages or req.messages, seed=self.cfg.seed, media=req.media, thinking=thinking, tools=req.tools,
                tool_choice=req.tool_choice, json_mode=req.json_mode, every_tool=fault == "parallel_tools",
                accuracy=self.cfg.accuracy, reasoning_words=self.cfg.reasoning_words, answer_words=self.cfg.answer_words,
                bad_tool_args=fault == "bad_args" or (self.cfg.bad_tool_args_rate > 0 and self.rng.random() < self.cfg.bad_tool_args_rate),
            )
            reasoning, content, tool_calls = reply.reasoning, reply.content, reply.tool_calls
            if fault == "long":
                content = ("x" * (self.cfg.long_line_bytes - 10)) + " " + content
            r_tok = estimate_text_tokens(reasoning)
            c_tok = estimate_text_tokens(content) + sum(estimate_text_tokens(tc["function"]["arguments"]) + 3 for tc in tool_calls or [])
            finish = "tool_calls" if tool_calls else "stop"
            if fault == "length" or (thinking and r_tok >= max_tokens):
                # the reasoning eats the whole budget: HTTP 200, empty answer
                reasoning = _clip_tokens(reasoning, max_tokens)
                r_tok, content, tool_calls, c_tok, finish = max_tokens, "", None, 0, "length"
            elif r_tok + c_tok > max_tokens:
                content = _clip_tokens(content, max_tokens - r_tok)
                c_tok, tool_calls, finish = estimate_text_tokens(content), None, "length"
            completion_tokens = r_tok + c_tok
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens, "cached_tokens": cached,
                     "prompt_tokens_details": {"cached_tokens": cached}}
            self.stats["prompt_tokens"] += prompt_tokens
            self.stats["completion_tokens"] += completion_tokens
            self.stats["cached_tokens"] += cached
            self.stats["per_key"][key]["tokens"] += prompt_tokens + completion_tokens
            self.stats["tokens_per_s"][int(time.monotonic() - self.started)] += prompt_tokens + completion_tokens
            cid = "chatcmpl-" + hashlib.blake2b(rid.encode(), digest_size=12).hexdigest()[:24]
            if req.stream:
                return await self._stream(request, key, rid, cid, model, reasoning, content, tool_calls, finish, usage,
                                          req.include_usage, fault)
            if self.cfg.latency_ms:
                await asyncio.sleep(self.cfg.latency_ms / 1000)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["reasoning_content"] = reasoning
            if tool_calls:
                message["tool_calls"] = tool_calls
            payload = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                       "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage,
                       "system_fingerprint": "fpv0_sim00001"}
            data = orjson.dumps(payload)
            self._count(200, key)
            if fault == "cut":
                resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json", "Content-Length": str(len(data)), "x-request-id": rid})
                await resp.prepare(request)
                await resp.write(data[: len(data) // 2])
                _abort(request)
                return resp
            return web.Response(body=data, content_type="application/json", headers={"x-request-id": rid})
        except SimError as err:
            self._count(err.status, key, err.etype)
            return self.error_response(err, rid)
        except ConnectionResetError:
            self.stats["client_disconnects"] += 1
            return web.Response(status=499)  # nobody reads it: the client is gone
        except Exception as exc:  # noqa: BLE001 - a simulator bug still answers in the envelope
            log.exception("simulator: unexpected error")
            bug = SimError(500, "server_error", f"simulator error: {type(exc).__name__}")
            self._count(500, key, bug.etype)
            return self.error_response(bug, rid)
        finally:
            self.stats["body_bytes_in_flight"] -= body_bytes
            if admitted:
                self.stats["in_flight"] -= 1
                self.limits.done(key, completion_tokens)  # type: ignore[arg-type]

    async def _stream(self, request: web.Request, key: str, rid: str, cid: str, model: str, reasoning: str, content: str,
                      tool_calls: list[dict[str, Any]] | None, finish: str, usage: dict[str, Any],
                      include_usage: bool, fault: str | None) -> web.StreamResponse:
        self.stats["streams"] += 1
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": rid}
        base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, choice_usage: dict[str, Any] | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            if choice_usage is not None:
                choice["usage"] = choice_usage
            return b"data: " + orjson.dumps({**base, "choices": [choice], **extra, "system_fingerprint": "fpv0_sim00001"}) + b"\n\n"

        n = max(1, self.cfg.chunk_tokens)
        events: list[tuple[bytes, int]] = [(chunk({"role": "assistant", "content": ""}), 0)]
        for piece in _pieces(reasoning, n):
            events.append((chunk({"reasoning_content": piece}), n))
        for piece in _pieces(content, n) if fault != "long" else [content]:
            events.append((chunk({"content": piece}), n))
        for i, call in enumerate(tool_calls or []):
            events.append((chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                  "function": {"name": call["function"]["name"], "arguments": ""}}]}), 1))
            for piece in _pieces(call["function"]["arguments"], n * 4):
                events.append((chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}), n))
        events.append((chunk({}, finish, usage), 0))
        if include_usage:
            events.append((b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n", 0))
        events.append((b"data: [DONE]\n\n", 0))
        self.stats["chunks"] += len(events)

        if fault == "nodone":
            events.pop()  # a clean end of the body, but no [DONE]
        cut_at = len(events) // 2 if fault in ("cut", "stall", "error_event") else None
        if self.cfg.latency_ms:
            await asyncio.sleep(self.cfg.latency_ms / 1000)
        pace = self.cfg.tokens_per_s
        if not pace and cut_at is None:
            # Unpaced: the same SSE bytes in one response (one send, not three).
            self._count(200, key)
            return web.Response(body=b"".join(e for e, _ in events), headers=headers)
        resp = web.StreamResponse(status=200, headers=headers)
        try:
            complete = await self._send_events(request, resp, events, cut_at, fault, pace)
        except ConnectionResetError:
            # the client went away mid-stream: normal under faults and stops, not a server error
            self.stats["client_disconnects"] += 1
            return resp
        if complete:
            self._count(200, key)
        return resp

    async def _send_events(self, request: web.Request, resp: web.StreamResponse, events: list[tuple[bytes, int]],
                           cut_at: int | None, fault: str | None, pace: float) -> bool:
        """Write the events; False when the fault cut the stream on purpose."""
        await resp.prepare(request)
        for i, (event, tokens) in enumerate(events):
            if i == cut_at:
                if fault == "stall":
                    await asyncio.sleep(self.cfg.stall_s)
                elif fault == "error_event":
                    err = {"error": {"type": "server_error", "message": "upstream stream failed", "code": "502001"}}
                    await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
                _abort(request)
                return False
            await resp.write(event)
            if pace and tokens:
                await asyncio.sleep(tokens / pace)
        return True

    # ---- pieces ----------------------------------------------------------------------------
    def _auth(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header.startswith("Bearer ") else ""
        if not key or (self.cfg.api_keys is not None and key not in self.cfg.api_keys):
            if self.cfg.error_style == "moonshot":
                raise SimError(401, "invalid_authentication_error", "Invalid Authentication")
            raise SimError(401, "authentication_error", "invalid api key", code="401002")
        return key

    def _fault(self, body: dict[str, Any], request: web.Request) -> str | None:
        header = request.headers.get("X-Sim-Fault")
        found: tuple[str, int | None] | None = (header, None) if header else None
        if found is None:
            for m in body["messages"]:
                match = _MARKER.search(text_of(m.get("content")) if isinstance(m, dict) else "")
                if match:
                    found = (match.group(1), int(match.group(2)) if match.group(2) else None)
                    break
        if found is not None:
            name, times = found
            if times is not None:
                h = hashlib.blake2b(orjson.dumps(body["messages"]), digest_size=8).hexdigest()
                self.attempts[h] += 1
                if self.attempts[h] > times:
                    return None
            return name
        if self.cfg.fail_rate and self.rng.random() < self.cfg.fail_rate:
            return self.rng.choice(self.cfg.fail_faults)
        return None

    def _fault_error(self, fault: str) -> SimError:
        if fault == "429":
            return self.rate_limit_error("rpm", 2.0, self.cfg.rpm or 60)
        if fault == "overload":
            return SimError(429, "engine_overloaded_error", "The engine is currently overloaded, please try again later", upstream=True)
        if fault == "html":
            return SimError(502, "bad_gateway", "Bad Gateway", html=True)
        if fault == "tpd":
            return SimError(429, "rate_limit_reached_error",
                            "Your account org-sim<ak-sim> request reached organization TPD rate limit, current:1507272, limit:1500000",
                            upstream=True, retry_after_s=self.cfg.tpd_retry_after_s)
        table = {
            "400": SimError(400, "invalid_request_error", "Invalid request: simulated bad request", upstream=True),
            "too_long": SimError(400, "invalid_request_error", "Input token length too long", upstream=True),
            "content_filter": SimError(400, "content_filter", "The request was rejected because it was considered high risk", upstream=True),
            "quota": SimError(429, "exceeded_current_quota_error",
                              "You exceeded your current token quota: <org-sim> 0, please check your account balance", upstream=True),
            "suspended": SimError(429, "exceeded_current_quota_error",
                                  "Your account org-sim<ak-sim> is suspended, please check your plan and billing details", upstream=True),
            "401": SimError(401, "authentication_error", "invalid api key", code="401002"),
            "402": SimError(402, "permission_error", "endpoint is inactive: FREE_QUOTA_EXHAUSTED", code="401007"),
            "403": SimError(403, "permission_error", "access denied: client IP is not in the allow-list", code="403001"),
            "451": SimError(451, "content_filter_error", "content was filtered by safety policy", code="451001"),
            "500": SimError(500, "unexpected_output", "invalid state transition", upstream=True),
            "502": SimError(502, "upstream_error", "provider error", code="502001", upstream=True,
                            upstream_status=500, upstream_code="unexpected_output"),
            "503": SimError(503, "service_unavailable", "service temporarily unavailable", code="503001"),
            "504": SimError(504, "gateway_timeout", "upstream timed out", code="504001"),
        }
        return table[fault]

    def _cached(self, key: str, messages: list[dict[str, Any]]) -> int:
        cache = self.prefix_cache[key]
        h = hashlib.blake2b(digest_size=8)
        cached = total = 0
        for m in messages[:-1]:
            h.update(orjson.dumps(m, option=orjson.OPT_SORT_KEYS))
            total += estimate_messages_tokens([m])
            digest = h.copy().digest()
            if digest in cache:
                cached = total
            elif len(cache) < 100_000:
                cache[digest] = total
        return cached

    async def models(self, request: web.Request) -> web.Response:
        self._auth_or_none(request)
        data = [{"id": m, "object": "model", "created": v["created"], "owned_by": "moonshot", "context_length": CONTEXT,
                 "supports_image_in": True, "supports_video_in": v["video"], "supports_reasoning": True} for m, v in MODELS.items()]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    def _auth_or_none(self, request: web.Request) -> None:
        try:
            self._auth(request)
        except SimError as err:
            raise web.HTTPUnauthorized(body=orjson.dumps({"error": {"type": err.etype, "message": err.message}}), content_type="application/json") from None

    async def estimate(self, request: web.Request) -> web.Response:
        """Moonshot's ``/v1/tokenizers/estimate-token-count``: the prompt tokens a chat request
        with these messages would be charged, as ``{"data": {"total_tokens": N}}``."""
        rid = uuid.uuid4().hex
        try:
            key = self._auth(request)
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise invalid("Invalid request: the body is not valid JSON", upstream=False, code="400001") from None
            if not isinstance(body, dict):
                raise invalid("Invalid request: the body must be a JSON object", upstream=False, code="400001")
            req = validate({"model": body.get("model"), "messages": body.get("messages")}, self.cfg.key_models.get(key),
                           self.cfg.unknown_model_status, self.cfg.endpoints)
            total = req.prompt_tokens
            return web.Response(body=orjson.dumps({"data": {"total_tokens": total}}), content_type="application/json")
        except SimError as err:
            return self.error_response(err, rid)

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats_json()), content_type="application/json")

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.Response(body=b"{}", content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes + 1024 * 1024 + 1)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        if self.cfg.models_endpoint:
            app.router.add_get("/v1/models", self.models)
        if self.cfg.estimate_endpoint:
            app.router.add_post("/v1/tokenizers/estimate-token-count", self.estimate)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.post_reset)
        return app


def _pieces(text: str, tokens_per_piece: int) -> list[str]:
    if not text:
        return []
    size = max(1, tokens_per_piece * 4)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _clip_tokens(text: str, tokens: int) -> str:
    return text[: max(0, tokens) * 4]


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _mask(key: str) -> str:
    return key[:5] + "..." + key[-4:] if len(key) > 12 else "***"
