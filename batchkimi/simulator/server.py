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
import time
import uuid
import weakref
from collections import Counter, defaultdict
from typing import Any

import orjson
from aiohttp import web

from ..tokens import estimate_text_tokens
from .answers import answer
from .cache import cached_tokens, namespace
from .config import ERROR_FAULTS, SimConfig
from .faults import error_response, fault_error, fault_of, rate_limit_error
from .limits import KeyLimits
from .stats import count, new_stats, stats_json
from .stream import abort, clip_tokens, stream
from .validate import CONTEXT, MODELS, SimError, invalid, validate

log = logging.getLogger("batchkimi.simulator")


def _sample_of(request: web.Request) -> int:
    """Which sample of a row a request is (batchkimi's ``X-Batchkimi-Sample``; 0 without it)."""
    value = request.headers.get("X-Batchkimi-Sample", "0")
    return int(value) if value.isdigit() and len(value) < 7 else 0


class Simulator:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.cfg = config or SimConfig()
        self.limits = KeyLimits(self.cfg.rpm, self.cfg.tpm, self.cfg.concurrency, window_s=self.cfg.window_s)
        self.rng = random.Random(self.cfg.seed)
        self.attempts: Counter[str] = Counter()  # request hash -> attempts seen (for NAME*N)
        self.prefix_cache: dict[str, dict[bytes, int]] = defaultdict(dict)
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.started = time.monotonic()
        self.stats: dict[str, Any] = new_stats()

    def stats_json(self) -> dict[str, Any]:
        return stats_json(self.stats, self.started)

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
            await asyncio.sleep(self.cfg.wait_s(self.cfg.rtt_ms * trips))
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
            fault = fault_of(self, body, request)
            if fault in ERROR_FAULTS:
                raise fault_error(self.cfg, fault)
            if self.cfg.tpm and prompt_tokens > self.cfg.tpm:
                # No wait would let it through: a request that cannot be served, not a rate limit.
                raise invalid(f"Invalid request: the prompt's {prompt_tokens} tokens exceed this key's tpm limit "
                              f"of {self.cfg.tpm}; it can never be served")
            limited = self.limits.admit(key, prompt_tokens)
            if limited is not None:
                dim, after = limited
                raise rate_limit_error(self.cfg, dim, after, {"rpm": self.cfg.rpm, "tpm": self.cfg.tpm, "concurrency": self.cfg.concurrency}[dim])
            admitted = True
            self.stats["in_flight"] += 1
            self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], self.stats["in_flight"])
            since = time.monotonic() - self.started
            self.stats["admitted_per_s"][int(since)] += 1
            self.stats["tokens_per_s"][int(since)] += prompt_tokens  # counted as the TPM limit counts: the prompt now
            self.stats["admitted"] += 1
            if self.stats["admitted_first_s"] is None:
                self.stats["admitted_first_s"] = since
            self.stats["admitted_last_s"] = since
            if fault is None and self.cfg.overload_rate and self.rng.random() < self.cfg.overload_rate:
                raise fault_error(self.cfg, "overload")
            if fault == "slow":
                await asyncio.sleep(self.cfg.slow_first_byte_s)
            keep_all = isinstance(body.get("thinking"), dict) and body["thinking"].get("keep") == "all"
            cached = (cached_tokens(self.prefix_cache, namespace(key, body), body["messages"], prompt_tokens,
                                    self.cfg.cache_block_tokens, history_reasoning=keep_all)
                      if self.cfg.cache_prefixes else 0)
            reply = answer(
                req.light_messages or req.messages, seed=self.cfg.seed, media=req.media, thinking=thinking, tools=req.tools,
                tool_choice=req.tool_choice, json_mode=req.json_mode, every_tool=fault == "parallel_tools",
                accuracy=self.cfg.accuracy, reasoning_words=self.cfg.reasoning_words, answer_words=self.cfg.answer_words,
                bad_tool_args=fault == "bad_args" or (self.cfg.bad_tool_args_rate > 0 and self.rng.random() < self.cfg.bad_tool_args_rate),
                sample=_sample_of(request), budget=max_tokens,
                shape=self.cfg.length_shape(model, thinking) if self.cfg.shape == "kimi" else None,
            )
            reasoning, content, tool_calls = reply.reasoning, reply.content, reply.tool_calls
            if fault == "long":
                content = ("x" * (self.cfg.long_line_bytes - 10)) + " " + content
            r_tok = estimate_text_tokens(reasoning)
            c_tok = estimate_text_tokens(content) + sum(estimate_text_tokens(tc["function"]["arguments"]) + 3 for tc in tool_calls or [])
            finish = "tool_calls" if tool_calls else "stop"
            if fault == "length" or (thinking and r_tok >= max_tokens):
                # the reasoning eats the whole budget: HTTP 200, empty answer
                reasoning = clip_tokens(reasoning, max_tokens)
                r_tok, content, tool_calls, c_tok, finish = max_tokens, "", None, 0, "length"
            elif r_tok + c_tok > max_tokens:
                content = clip_tokens(content, max_tokens - r_tok)
                c_tok, tool_calls, finish = estimate_text_tokens(content), None, "length"
            completion_tokens = r_tok + c_tok
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens, "cached_tokens": cached,
                     "prompt_tokens_details": {"cached_tokens": cached}}
            self.stats["prompt_tokens"] += prompt_tokens
            self.stats["completion_tokens"] += completion_tokens
            self.stats["cached_tokens"] += cached
            self.stats["per_key"][key]["tokens"] += prompt_tokens + completion_tokens
            cid = "chatcmpl-" + hashlib.blake2b(rid.encode(), digest_size=12).hexdigest()[:24]
            if req.stream:
                return await stream(self, request, key, rid, cid, model, reasoning, content, tool_calls, finish, usage,
                                          req.include_usage, fault)
            # the whole answer at once: the first token's time, then every token at the decode rate
            wait = self.cfg.wait_s(self.cfg.latency_ms or 0.0) + (completion_tokens / self.cfg.pace if self.cfg.pace else 0.0)
            if wait:
                await asyncio.sleep(wait)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["reasoning_content"] = reasoning
            if tool_calls:
                message["tool_calls"] = tool_calls
            payload = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                       "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage,
                       "system_fingerprint": "fpv0_sim00001"}
            data = orjson.dumps(payload)
            count(self.stats, 200, key)
            if fault == "cut":
                resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json", "Content-Length": str(len(data)), "x-request-id": rid})
                await resp.prepare(request)
                await resp.write(data[: len(data) // 2])
                abort(request)
                return resp
            return web.Response(body=data, content_type="application/json", headers={"x-request-id": rid})
        except SimError as err:
            count(self.stats, err.status, key, err.etype)
            return error_response(self.cfg, err, rid)
        except ConnectionResetError:
            self.stats["client_disconnects"] += 1
            return web.Response(status=499)  # nobody reads it: the client is gone
        except Exception as exc:  # noqa: BLE001 - a simulator bug still answers in the envelope
            log.exception("simulator: unexpected error")
            bug = SimError(500, "server_error", f"simulator error: {type(exc).__name__}")
            count(self.stats, 500, key, bug.etype)
            return error_response(self.cfg, bug, rid)
        finally:
            self.stats["body_bytes_in_flight"] -= body_bytes
            if admitted:
                self.stats["in_flight"] -= 1
                self.limits.done(key, completion_tokens)  # type: ignore[arg-type]
                if completion_tokens:  # ... and the completion when it is answered
                    self.stats["tokens_per_s"][int(time.monotonic() - self.started)] += completion_tokens

    # ---- pieces ----------------------------------------------------------------------------
    def _auth(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header.startswith("Bearer ") else ""
        if not key or (self.cfg.api_keys is not None and key not in self.cfg.api_keys):
            if self.cfg.error_style == "moonshot":
                raise SimError(401, "invalid_authentication_error", "Invalid Authentication")
            raise SimError(401, "authentication_error", "invalid api key", code="401002")
        return key

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._auth(request)
        except SimError as err:  # in the same envelope as the chat endpoint's
            return error_response(self.cfg, err, uuid.uuid4().hex)
        data = [{"id": m, "object": "model", "created": v["created"], "owned_by": "moonshot", "context_length": CONTEXT,
                 "supports_image_in": True, "supports_video_in": v["video"], "supports_reasoning": True} for m, v in MODELS.items()]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

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
            return error_response(self.cfg, err, rid)

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


