"""The tests' loopback S3 server (moto) in its own process, for benchmarks: prints its URL, then
for each line read on stdin the requests it served by method, and the GETs by path (JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.s3_server import S3Server  # noqa: E402

server = S3Server()
print(server.url, flush=True)
for _ in sys.stdin:
    gets = {path: n for (method, path), n in server.objects.items() if method == "GET"}
    print(json.dumps({**server.methods, "gets": gets}), flush=True)
