"""The job: what to read, what to send, where to write, how fast.

- :mod:`.job`: :class:`Job`, a frozen record of every setting (one field per job key);
- :mod:`.load`: job files and flags into a checked Job, and the API key;
- :mod:`.specs`: the ``[extract]`` and ``[score]`` tables, checked.

May import: ``errors``, ``kimi``, ``policy.rerun``. Every layer above may import it.
"""

from .job import DEFAULT_BASE_URL, SIMULATOR, SIMULATOR_PACING, Job
from .load import check_job, job_notices, load_job, resolve_api_key

__all__ = ["DEFAULT_BASE_URL", "SIMULATOR", "SIMULATOR_PACING", "Job", "check_job", "job_notices", "load_job",
           "resolve_api_key"]
