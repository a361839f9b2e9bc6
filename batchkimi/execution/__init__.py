"""Running a job: the frozen plan (``plan``: input, output, resume, what to send), the run that
owns the writer, summary, budget and signals (``run``), and the executors that send the rows
(``local``; ``ray`` with its cluster-wide limiter), one request at a time through the row
engine (``row``), each row prepared the same way (``rows``).

May import: every layer below (``input``, ``output``, ``http``, ``policy``, ``request``,
``config``, the foundation); never the simulator.
"""
