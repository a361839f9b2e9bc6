"""Reading outputs for people: ``report`` and ``compare`` (with their statistics), ``export``
(CSV, JSONL, OpenAI Batch output) and ``html`` (one self-contained page).

May import: ``scoring`` and every layer below.
"""
