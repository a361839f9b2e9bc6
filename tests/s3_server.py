"""A real S3-protocol server on loopback (moto's S3 behind werkzeug, as moto's own
ThreadedMotoServer runs it), reached the way real S3 is: botocore and s3fs with
``AWS_ENDPOINT_URL``. It counts the requests it serves by method and by object."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


class S3Server:
    def __init__(self) -> None:
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
