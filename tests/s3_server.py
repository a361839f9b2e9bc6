"""A real S3-protocol server on loopback (moto's S3 behind werkzeug, as moto's own
ThreadedMotoServer runs it), reached the way real S3 is: botocore and s3fs with
``AWS_ENDPOINT_URL``. It counts the requests it serves by method and by object."""

from __future__ import annotations

import collections
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class S3Server:
    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = DomainDispatcherApplication(create_backend_app)
        self.methods: collections.Counter[str] = collections.Counter()
        self.objects: collections.Counter[tuple[str, str]] = collections.Counter()  # (method, path)
        self._lock = threading.Lock()

        def counting(environ: dict[str, Any], start_response: Any) -> Any:
            with self._lock:
                self.methods[environ["REQUEST_METHOD"]] += 1
                self.objects[(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))] += 1
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-s3", daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self._lock:
            self.methods.clear()
            self.objects.clear()

    def count(self, method: str, suffix: str = "") -> int:
        """Requests of ``method`` served, on paths ending with ``suffix`` if given."""
        with self._lock:
            if not suffix:
                return self.methods[method]
            return sum(n for (m, p), n in self.objects.items() if m == method and p.endswith(suffix))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[Any]:
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture()
def s3(s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh bucket, credentials and endpoint in the environment, a cache of local copies of
    this test's own; ``s3.bucket``, ``s3.env`` (for subprocesses), ``s3.fs``."""
    import boto3
    import s3fs

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server.url, "BATCHKIMI_CACHE_DIR": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bk-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=bucket)
    s3_server.bucket, s3_server.env = bucket, env
    s3_server.fs = s3fs.S3FileSystem()
    s3_server.reset()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
