"""Helpers shared by the benchmark scenarios: datasets, a simulator in its own process,
CPU and memory readings. Every scenario prints one JSON object on its last line."""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class SimProcess:
    """The simulator in a separate process (so it never shares a core's GIL with the client)."""

    def __init__(self, **settings: Any) -> None:
        self.port = free_port()
        self.tls = bool(settings.get("tls"))
        self.ca_file = str(WORK / f"sim-ca-{self.port}.pem") if self.tls else None
        cfg = {"port": self.port, "reasoning_words": 8, "answer_words": 6, **settings}
        if self.tls:
            WORK.mkdir(parents=True, exist_ok=True)
            cfg["ca_out"] = self.ca_file
        self.proc = subprocess.Popen([sys.executable, str(HERE / "sim_server.py"), json.dumps(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"simulator did not start: {self.proc.stderr.read().decode() if self.proc.stderr else ''}") from None
                time.sleep(0.1)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    def _open(self, req: Any) -> bytes:
        ctx = ssl.create_default_context(cafile=self.ca_file) if self.tls else None
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.read()

    def stats(self) -> dict[str, Any]:
        return json.loads(self._open(self.base_url[: -len("/v1")] + "/stats"))

    def reset(self) -> None:
        self._open(urllib.request.Request(self.base_url[: -len("/v1")] + "/stats/reset", method="POST"))

    def cpu_s(self) -> float:
        try:
            import psutil

            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 - psutil missing: no server CPU figure
            return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_prompts(path: Path, n: int, text: str = "What is {i} + 1? Reply with the number.") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size and sum(1 for _ in open(path, "rb")) == n:
        return path
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"q{i}", "prompt": text.format(i=i)}) + "\n")
    return path


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def client_ssl() -> Any:
    """The TLS context a benchmark client uses: trusting the simulator's test CA (BENCH_CA_FILE)."""
    ca = os.environ.get("BENCH_CA_FILE")
    return ssl.create_default_context(cafile=ca) if ca else True


def run_loop(main: Any) -> Any:
    """Run ``main()`` on the loop BENCH_LOOP names (asyncio by default, or uvloop)."""
    import asyncio

    factory = None
    if os.environ.get("BENCH_LOOP") == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def run_scenario(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "TOKENHUB_API_KEY": "sk-bench", **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
