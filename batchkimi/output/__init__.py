"""The output directory: the result table and its row constructors (``results``), the journal,
the Parquet parts and their compaction (``parts``), the one writer's facade (``sink``), and
what the output has spent (``spend``).

May import: the foundation, ``config``, ``policy``.
"""
