"""batchkimi: large batches of Kimi chat completions on Tencent Cloud TokenHub.

Library use::

    import batchkimi
    job = batchkimi.load_job("jobs/demo.toml")
    summary = batchkimi.run(job)
    df = batchkimi.read_results(job.output)
"""

__version__ = "0.1.0"

from .api import RowEngine, Summary, run, run_async  # noqa: E402
from .config import Job, load_job  # noqa: E402
from .output.sink import read_results  # noqa: E402

__all__ = ["Job", "RowEngine", "Summary", "__version__", "load_job", "read_results", "run", "run_async"]
