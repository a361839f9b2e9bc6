"""One HTTP attempt and what the server said: the transport (the only aiohttp importer, its
exceptions translated in one place), the SSE decoder, the answer's fields (``response``), a
stream's assembly (``stream``) and error envelopes (``errors``). It reports what happened;
``policy.disposition`` decides what it means.

May import: the foundation, ``config``, ``policy``.
"""
