"""The input: rows from JSONL, Parquet and OpenAI Batch files (``reader``), cut into blocks for
Ray (``blocks``), a folder of images and videos walked into an index (``folder``), what an
output remembers of its input (``history``), and images and videos: their type from their
bytes (``sniff``), the media root (``sandbox``), references made request parts (``media``),
read and encoded when sent (``send``).

May import: the foundation and ``config``.
"""
