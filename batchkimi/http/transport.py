"""The transport: one HTTP attempt at one chat completion. The only client module that
imports aiohttp, and the one place its exceptions become :class:`~batchkimi.errors.APIError`.

Timeouts (seconds, see :class:`Timeouts`): ``connect`` for the TCP/TLS connection;
``first_byte`` until a stream's first chunk; ``idle`` for the longest gap between two
stream chunks; ``attempt`` for the whole attempt (for a non-streaming request, the answer
is the first byte, so only ``attempt`` applies). One deadline is moved forward as chunks
arrive, so a stalled stream is cut within ``idle`` seconds however long it has run.

The stream is read with ``iter_any()`` and split by :class:`~batchkimi.http.sse.SSEDecoder`:
``resp.content`` line iteration raises on lines over 128 KiB, and Kimi's get that long.
After ``[DONE]`` the body is read to its end (for at most ``drain`` seconds): a response
dropped before its end closes the connection, and over the internet each new one is a TLS
handshake.

Everything a server says (error text, answers) passes :meth:`Transport.redact` before it
leaves this module: a server that quotes the API key back never gets it printed or stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import orjson

from ..errors import APIError, ResponseError, TransportError
from ..policy.retry import parse_retry_after
from ..version import __version__
from .errors import error_from_response
from .response import Answer, parse_completion
from .sse import SSEDecoder
from .stream import StreamAssembler, looks_like_sse, parse_sse_body


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 15.0
    first_byte_s: float = 180.0
    idle_s: float = 90.0
    attempt_s: float = 1800.0
    drain_s: float = 1.0  # after [DONE]: wait this long for the body's end, to keep the connection


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete answer and what the response said about the server's limits."""

    answer: Answer
    http_status: int
    request_id: str | None
    ratelimit_reset_s: float | None  # set when X-RateLimit-Remaining said 0


REDACT_MIN_KEY_CHARS = 16  # real keys are long (Moonshot's: "sk-" and 48 more)
_REQUEST_ID_HEADERS = ("x-request-id", "msh-request-id", "x-tc-requestid", "request-id")


def _request_id(headers: Mapping[str, str]) -> str | None:
    for name in _REQUEST_ID_HEADERS:
        value = headers.get(name)
        if value:
            return str(value)
    return None


def _ratelimit_reset_s(headers: Mapping[str, str]) -> float | None:
    """When X-RateLimit-Remaining(-Requests) is 0: seconds until X-RateLimit-Reset."""
    remaining = headers.get("x-ratelimit-remaining-requests") or headers.get("x-ratelimit-remaining")
    if remaining is None or str(remaining).strip() not in ("0", "0.0"):
        return None
    reset = headers.get("x-ratelimit-reset-requests") or headers.get("x-ratelimit-reset")
    if reset is None:
        return None
    text = str(reset).strip().rstrip("s")
    try:
        value = float(text)
    except ValueError:
        return None
    # Either seconds from now or an epoch time.
    return max(0.0, value - time.time()) if value > 1e9 else max(0.0, value)


class Transport:
    """POSTs chat completions to ``{base_url}/chat/completions``. Use as an async context manager."""

    def __init__(self, base_url: str, api_key: str, timeouts: Timeouts = Timeouts(), *,
                 ca_file: str | None = None, ca_pem: bytes | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.ca_pem = ca_pem  # handed on to other processes' transports (a Ray run's workers)
        self._ssl: ssl.SSLContext | bool = True
        if ca_file or ca_pem:  # trusted as well as the system's CAs: a company proxy, a test server
            ctx = ssl.create_default_context()
            ctx.load_verify_locations(cafile=ca_file, cadata=ca_pem.decode() if ca_pem else None)
            self._ssl = ctx
        self._redact_key = api_key if len(api_key) >= REDACT_MIN_KEY_CHARS else ""
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the key
        return f"Transport({self.url!r})"

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30, ssl=self._ssl)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s),
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "Content-Type": "application/json",
                "User-Agent": f"batchkimi/{__version__}",
            },
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``. A key shorter than
        ``REDACT_MIN_KEY_CHARS`` (a local placeholder such as ``EMPTY`` or ``dummy``) is no secret,
        and replacing it would mangle answers that happen to contain the word."""
        key = self._redact_key
        return text.replace(key, "***") if key and key in text else text

    def _redact_answer(self, answer: Answer) -> Answer:
        key = self._redact_key
        if not key or not (key in answer.content or (answer.reasoning_content is not None and key in answer.reasoning_content)
                           or (answer.tool_calls is not None and key in str(answer.tool_calls))):
            return answer
        calls = None
        if answer.tool_calls:
            calls = [{**c, "id": self.redact(c["id"]) if c.get("id") else c.get("id"),
                      "function": {"name": self.redact(c["function"]["name"]), "arguments": self.redact(c["function"]["arguments"])}}
                     for c in answer.tool_calls]
        return dataclasses.replace(
            answer, content=self.redact(answer.content), tool_calls=calls,
            reasoning_content=None if answer.reasoning_content is None else self.redact(answer.reasoning_content))

    async def complete(self, body: dict, *, stream: bool, payload: bytes | None = None, sample: int = 0) -> Reply:
        """One attempt. Raises an :class:`APIError` subclass for anything but a complete answer.
        ``payload`` is ``body`` already encoded (the engine encodes it once, when it checks the row).
        ``sample``: which of a row's samples this is, sent as ``X-Batchkimi-Sample`` when not the
        first (servers ignore it; the simulator answers each sample of a row on its own)."""
        assert self._session is not None, "use Transport as an async context manager"
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.timeouts.attempt_s
        phase = "first_byte"  # aiohttp raises its own error for a slow connect (sock_connect)
        first = min(deadline, start + (self.timeouts.first_byte_s if stream else self.timeouts.attempt_s))
        try:
            async with asyncio.timeout_at(first) as guard:
                async with self._session.post(self.url, data=payload if payload is not None else orjson.dumps(body),
                                              headers={"X-Batchkimi-Sample": str(sample)} if sample else None) as resp:
                    status = resp.status
                    headers = resp.headers
                    ctype = headers.get("Content-Type", "")
                    request_id = _request_id(headers)
                    if status >= 300:
                        raw = await resp.read()
                        raise error_from_response(status, raw, ctype, request_id=request_id,
                                                  retry_after_s=parse_retry_after(headers.get("Retry-After"), time.time()))
                    if "text/event-stream" in ctype:
                        decoder = SSEDecoder()
                        asm = StreamAssembler()
                        ttft: float | None = None
                        idle = self.timeouts.idle_s
                        # Moving the deadline costs a timer each time: move it at most every
                        # tenth of the idle limit (a stall is cut within 0.9 to 1.0 of it).
                        step = idle / 10
                        moved_at = -step
                        async for chunk in resp.content.iter_any():
                            now = loop.time()
                            if now - moved_at >= step:
                                phase, moved_at = "idle", now
                                guard.reschedule(min(deadline, now + idle))
                            for data in decoder.feed(chunk):
                                if asm.add(data):
                                    break
                                if ttft is None and (asm.content or asm.reasoning or asm.tools):
                                    ttft = now - start
                            if asm.done:
                                break
                        if not asm.done:
                            for data in decoder.close():
                                asm.add(data)
                        elif not resp.content.at_eof():
                            await self._drain(resp)
                        answer = asm.finish(ttft)
                    else:
                        raw = await resp.read()
                        # A proxy may label an SSE stream text/plain, application/json or nothing.
                        answer = parse_sse_body(raw) if looks_like_sse(raw) else parse_completion(raw)
                    rid = request_id or answer.response_id
                    return Reply(self._redact_answer(answer), status, self.redact(rid) if rid else rid, _ratelimit_reset_s(headers))
        except APIError as exc:  # the server's own words: the key never leaves in them
            redacted = exc.rewritten(self.redact)
            raise redacted.with_traceback(exc.__traceback__) from exc.__cause__
        except aiohttp.ConnectionTimeoutError as exc:
            raise TransportError(f"cannot connect to {self.url} within {self.timeouts.connect_s:g}s", error_type="connect_timeout", retryable=True) from exc
        except TimeoutError:
            if loop.time() >= deadline - 1e-3:
                what, name = f"the attempt took longer than {self.timeouts.attempt_s:g}s", "timeout"
            elif phase == "idle":
                what, name = f"the stream stalled: no data for {self.timeouts.idle_s:g}s", "stream_stalled"
            elif stream:
                what, name = f"no first chunk within {self.timeouts.first_byte_s:g}s", "first_byte_timeout"
            else:
                what, name = f"no answer within {first - start:g}s", "timeout"
            raise TransportError(what, error_type=name, retryable=True) from None
        except aiohttp.ClientConnectorCertificateError as exc:  # waiting will not make it trusted
            raise TransportError(f"the TLS certificate of {self.url} is not trusted ({exc.certificate_error}); if "
                                 "a proxy or a test server signs it, set ca_file to its CA", error_type="certificate_error",
                                 fatal=True) from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportError(f"cannot connect to {self.url}: {exc.os_error}", error_type="connect_error", retryable=True) from exc
        except aiohttp.ClientPayloadError as exc:
            raise ResponseError(f"the response was cut: {exc}", error_type="stream_cut", retryable=True) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError) as exc:
            kind = "stream_cut" if phase == "idle" else "connection_error"
            raise TransportError(f"the connection was lost: {exc!r}", error_type=kind, retryable=True) from exc
        except aiohttp.InvalidURL as exc:
            raise TransportError(f"invalid URL {self.url}", error_type="invalid_url", fatal=True) from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"HTTP client error: {exc!r}", error_type="client_error", retryable=True) from exc

    async def _drain(self, resp: aiohttp.ClientResponse) -> None:
        """Read what follows [DONE] (the chunked body's end) so the connection goes back to the
        pool; give up after ``drain_s`` (the connection is then closed, the answer kept)."""
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
            async with asyncio.timeout(self.timeouts.drain_s):
                while await resp.content.readany():
                    pass
