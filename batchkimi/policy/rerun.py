"""What a rerun of the same command sends again, and what it never pays for twice. Pure.

Every row of an output has one *kind*, from its latest status and, for an error, from why it
failed:

=============  =====================================================  =========================
kind           what it is                                             sent again by a rerun
=============  =====================================================  =========================
``ok``         an answer                                              never
``invalid``    refused before sending (names what to fix)             with ``retry = ["all"]``
``truncated``  cut at ``max_tokens`` (``finish_reason: length``)      with a larger ``max_tokens``,
                                                                      or ``retry = ["truncated"]``
``transient``  a failure that can pass: 408, 409, 425, 429, 5xx, a    always
               timeout, a cut stream, an error event inside a
               stream, an unreachable host, a file unreadable when
               sent
``refused``    a deterministic refusal: any other 4xx (400, 413,      with ``retry = ["refused"]``
               451 content filter, a prompt over the context
               window), a content-filtered answer, a malformed 2xx
               answer (tried twice already)
=============  =====================================================  =========================

``retry = ["errors"]`` sends every error row (transient and refused); ``["all"]`` sends every
row that is not ``ok``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KINDS = ("ok", "invalid", "truncated", "transient", "refused", "other")
# A 2xx reply that came whole but held nothing usable, or that was withheld: deterministic.
REFUSED_2XX = ("bad_response", "bad_stream", "empty_answer", "content_filter")
_TRANSIENT_STATUS = (408, 409, 425, 429)


def kind_of(status: str, http_status: int | None, error_type: str | None) -> str:
    """The kind of one row (see the module docstring)."""
    if status in ("ok", "invalid", "truncated"):
        return status
    if status != "error":
        return "other"
    if error_type in REFUSED_2XX:
        return "refused"
    if http_status is None or http_status < 300 or http_status in _TRANSIENT_STATUS or http_status >= 500:
        return "transient"
    return "refused"


def kinds_of(statuses: np.ndarray, http_status: Any, error_type: Any) -> np.ndarray:
    """:func:`kind_of` over whole columns (statuses as objects, the others as Arrow arrays):
    codes into :data:`KINDS`."""
    out = np.full(len(statuses), KINDS.index("other"), dtype=np.int8)
    for name in ("ok", "invalid", "truncated"):
        out[statuses == name] = KINDS.index(name)
    errors = np.flatnonzero(statuses == "error")
    if errors.size:
        idx = pa.array(errors)
        http = pc.take(http_status, idx).to_pylist()
        etype = pc.take(error_type, idx).to_pylist()
        out[errors] = [KINDS.index(kind_of("error", h, e)) for h, e in zip(http, etype, strict=True)]
    return out


def resend_mask(kinds: np.ndarray, old_max_tokens: np.ndarray, retry: frozenset[str],
                max_tokens: int | None) -> np.ndarray:
    """Which rows (aligned with ``kinds``) a rerun sends again."""
    code = {name: KINDS.index(name) for name in KINDS}
    send = kinds == code["transient"]
    if retry & {"refused", "errors", "all"}:
        send |= kinds == code["refused"]
    if "all" in retry:
        send |= (kinds == code["invalid"]) | (kinds == code["other"])
    truncated = kinds == code["truncated"]
    if retry & {"truncated", "all"}:
        send |= truncated
    elif max_tokens is not None:
        # Final for the budget that produced it: only a larger one can give a whole answer.
        send |= truncated & (old_max_tokens >= 0) & (old_max_tokens < max_tokens)
    return send
