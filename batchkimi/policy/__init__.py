"""Decisions with no I/O: what a failed attempt means (``disposition``), when and how long to
retry (``retry``), the rate limiter (``ratelimit``), the early stop (``breaker``), what a rerun
sends again (``rerun``), the cost ceiling (``budget``), the bytes in flight (``bytes``).

May import: the foundation and ``config``.
"""
