"""Every error batchkimi raises, drawn once.

::

    BatchKimiError                  base; never raised itself
    ├── JobError                    stops the job before or during a run (exit code 1)
    │   ├── ConfigError             a job key or flag is wrong: names the key
    │   │   └── MissingKeyError     no API key: names the variable or file to set
    │   ├── DatasetError            the input cannot be used: names the file, row, column
    │   ├── OutputError             the output directory cannot be written or resumed
    │   └── FatalAPIError           the API refuses the whole job (401, 402, 403, quota,
    │                               a wrong model or URL, the first rows all failing alike,
    │                               an unreachable host): stop early, nothing done is lost
    └── APIError                    one request failed; after its retries it becomes a
        │                           result row with status "error", never ends the run
        ├── HTTPStatusError         the server answered with a non-2xx status
        ├── TransportError          connect failure, reset, timeout, stall, cut stream
        └── ResponseError           a 2xx answer that is not a complete answer (bad JSON,
                                    a field missing or of the wrong type, an error event
                                    inside a stream, no [DONE])

A job that stops for a JobError during a run first writes what is done (requests in flight
get their grace period), so the same command resumes it. ``RowAbandoned`` (in
:mod:`batchkimi.execution.row`) is not an error: a row a stopping engine did not send.

``APIError`` carries what the result row needs (``error_type``, ``http_status``,
``request_id``, ``retryable``, ``retry_after_s``).  aiohttp's exceptions are translated
into ``TransportError`` in exactly one place, ``batchkimi.http.transport``.
"""

from __future__ import annotations

from typing import Any


def json_type(value: Any) -> str:
    """A JSON value's type as a message says it: "an object", "an array", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class BatchKimiError(Exception):
    """Base of every batchkimi error."""


class JobError(BatchKimiError):
    """The job as a whole cannot go on."""


class ConfigError(JobError):
    """A job key or command-line flag has a wrong value."""


class MissingKeyError(ConfigError):
    """No API key was found where the job says to look."""


class DatasetError(JobError):
    """The input dataset cannot be used as a whole (missing file, duplicate ids...)."""


class OutputError(JobError):
    """The output directory cannot be written, or does not match this job."""


class FatalAPIError(JobError):
    """The API refused the account itself: every further request would fail the same way."""

    def __init__(self, message: str, *, cause: APIError | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class APIError(BatchKimiError):
    """One attempt at one request failed.

    ``error_type`` is the server's ``error.type`` when it sent one, otherwise a batchkimi
    name such as ``timeout`` or ``stream_cut``.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str,
        http_status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.http_status = http_status
        self.code = code
        self.request_id = request_id
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        # fatal: the account itself is refused (auth, quota, balance); stop the job.
        self.fatal = fatal

    def __str__(self) -> str:
        status = f"HTTP {self.http_status} " if self.http_status else ""
        return f"{status}{self.error_type}: {self.message}"

    def rewritten(self, edit: Any) -> APIError:
        """A copy of this error, of the same class, with ``edit`` applied to its text (the
        transport removes the API key from what a server said this way)."""
        return type(self)(edit(self.message), error_type=self.error_type, http_status=self.http_status, code=self.code,
                          request_id=edit(self.request_id) if self.request_id else self.request_id,
                          retryable=self.retryable, retry_after_s=self.retry_after_s, fatal=self.fatal)


class HTTPStatusError(APIError):
    """A non-2xx answer."""


class TransportError(APIError):
    """The connection failed, timed out, stalled or was cut."""


class ResponseError(APIError):
    """A 2xx answer that is not a complete, well-formed answer."""
