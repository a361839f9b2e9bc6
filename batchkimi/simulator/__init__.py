"""batchkimi's TokenHub simulator: a free rehearsal of a job. See :mod:`.server`."""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .config import FAULTS, SimConfig
from .server import Simulator
from .validate import SimError

log = logging.getLogger("batchkimi.simulator")

__all__ = ["FAULTS", "AppThread", "SimConfig", "SimError", "SimHandle", "Simulator", "serve", "serve_app_in_thread", "start_in_thread"]


@dataclass
class AppThread:
    """An aiohttp app served from its own event loop in a background thread."""

    port: int
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _runner: web.AppRunner

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            await self._runner.cleanup()
            # handlers still stalling on purpose (the stall fault): end them, not leak them
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in handlers:
                t.cancel()
            if handlers:
                await asyncio.wait(handlers)
            for t in handlers:  # cancelled is the expected end; anything else is said, not dropped
                if not t.cancelled() and t.exception() is not None:
                    log.warning("simulator handler ended with %r while stopping", t.exception())

        fut = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: BLE001 - shutting down: nothing to report to anyone
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def tls_context(host: str) -> tuple[ssl.SSLContext, bytes]:
    """A server TLS context whose certificate (for ``host``, 127.0.0.1 and localhost) is signed
    by a fresh test CA made by trustme, and that CA's certificate (PEM) for clients to trust."""
    try:
        import trustme
    except ImportError:
        raise RuntimeError("the simulator's TLS needs trustme: pip install trustme") from None
    ca = trustme.CA()
    names = dict.fromkeys([host if host not in ("", "0.0.0.0") else "127.0.0.1", "127.0.0.1", "localhost"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx, ca.cert_pem.bytes()


async def _start(app: web.Application, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]
    return runner, sockets[0].getsockname()[1]


def serve_app_in_thread(app: web.Application, host: str = "127.0.0.1", port: int = 0, name: str = "batchkimi-server",
                        ssl_context: ssl.SSLContext | None = None) -> AppThread:
    """Serve ``app`` on ``host:port`` (0: a free port) from a background thread with its own loop."""
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            ready["runner"], ready["port"] = loop.run_until_complete(_start(app, host, port, ssl_context))
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            ready["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    started.wait(30)
    if "error" in ready:
        raise ready["error"]
    return AppThread(ready["port"], loop, thread, ready["runner"])


@dataclass
class SimHandle:
    """A simulator running in a thread of this process."""

    base_url: str  # http://127.0.0.1:PORT/v1 (https:// with tls)
    port: int
    simulator: Simulator
    server: AppThread
    ca_pem: bytes | None = None  # with tls: the test CA a client must trust

    def stop(self) -> None:
        self.server.stop()


def start_in_thread(options: dict[str, Any] | SimConfig | None = None, api_keys: Any = None) -> SimHandle:
    """Start a simulator on a free loopback port in a background thread (for ``base_url = "simulator"``)."""
    cfg = options if isinstance(options, SimConfig) else SimConfig.from_mapping(dict(options or {}))
    if api_keys is not None:
        cfg.api_keys = tuple(api_keys)
    sim = Simulator(cfg)
    ctx, ca = tls_context(cfg.host) if cfg.tls else (None, None)
    server = serve_app_in_thread(sim.app(), cfg.host, cfg.port, name="batchkimi-simulator", ssl_context=ctx)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    return SimHandle(f"{'https' if cfg.tls else 'http'}://{host}:{server.port}/v1", server.port, sim, server, ca)


def serve(cfg: SimConfig, on_ready: Any = None, ca_out: str | None = None) -> None:
    """Serve in the foreground until Ctrl-C (``batchkimi simulate``); with TLS, the test CA's
    certificate is written to ``ca_out`` for clients to trust."""

    async def main() -> None:
        sim = Simulator(cfg)
        ctx = None
        if cfg.tls:
            ctx, ca = tls_context(cfg.host)
            if ca_out:
                with open(ca_out, "wb") as fh:
                    fh.write(ca)
        runner, port = await _start(sim.app(), cfg.host, cfg.port, ctx)
        if on_ready:
            on_ready(port)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
