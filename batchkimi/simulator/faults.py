"""The simulator's errors: which fault a request asks for, and the answer each one is, in
TokenHub's envelope or Moonshot's."""

from __future__ import annotations

import hashlib
import time
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import web

from .answers import text_of
from .config import MARKER, SimConfig
from .validate import SimError


def error_response(cfg: SimConfig, err: SimError, request_id: str) -> web.Response:
    """A SimError as the answer TokenHub (or Moonshot, by ``error_style``) sends."""
    headers = {"x-request-id": request_id}
    if err.retry_after_s is not None and cfg.retry_after != "none":
        if cfg.retry_after == "date":
            headers["Retry-After"] = formatdate(time.time() + err.retry_after_s, usegmt=True)
        else:
            headers["Retry-After"] = str(int(err.retry_after_s))
    if err.html:
        page = f"<html><head><title>{err.status} Bad Gateway</title></head><body><center><h1>{err.status} Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
        return web.Response(status=err.status, text=page, content_type="text/html", headers=headers)
    if cfg.error_style == "moonshot":
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

def rate_limit_error(cfg: SimConfig, dimension: str, retry_after_s: float, limit: int) -> SimError:
    if cfg.rate_limit_style == "moonshot":
        what = {"rpm": f"max RPM: {limit}", "tpm": f"TPM rate limit, current:{limit}, limit:{limit}",
                "concurrency": f"max concurrency: {limit}"}[dimension]
        msg = f"Your account org-sim<ak-sim> request reached organization {what}, please try again after {int(retry_after_s)} seconds"
        return SimError(429, "rate_limit_reached_error", msg, retry_after_s=retry_after_s)
    return SimError(429, "rate_limit_error", f"rate limit exceeded on dimension: {dimension}", code="429001", retry_after_s=retry_after_s)


def fault_of(sim: Any, body: dict[str, Any], request: web.Request) -> str | None:
    """The fault this request asks for (a header, a prompt marker ``[[sim:NAME*N]]``), or a random one."""
    header = request.headers.get("X-Sim-Fault")
    found: tuple[str, int | None] | None = (header, None) if header else None
    if found is None:
        for m in body["messages"]:
            match = MARKER.search(text_of(m.get("content")) if isinstance(m, dict) else "")
            if match:
                found = (match.group(1), int(match.group(2)) if match.group(2) else None)
                break
    if found is not None:
        name, times = found
        if times is not None:
            h = hashlib.blake2b(orjson.dumps(body["messages"]), digest_size=8).hexdigest()
            sim.attempts[h] += 1
            if sim.attempts[h] > times:
                return None
        return name
    if sim.cfg.fail_rate and sim.rng.random() < sim.cfg.fail_rate:
        return sim.rng.choice(sim.cfg.fail_faults)
    return None

def fault_error(cfg: SimConfig, fault: str) -> SimError:
    if fault == "429":
        return rate_limit_error(cfg, "rpm", 2.0, cfg.rpm or 60)
    if fault == "overload":
        return SimError(429, "engine_overloaded_error", "The engine is currently overloaded, please try again later", upstream=True)
    if fault == "html":
        return SimError(502, "bad_gateway", "Bad Gateway", html=True)
    if fault == "tpd":
        return SimError(429, "rate_limit_reached_error",
                        "Your account org-sim<ak-sim> request reached organization TPD rate limit, current:1507272, limit:1500000",
                        upstream=True, retry_after_s=cfg.tpd_retry_after_s)
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
