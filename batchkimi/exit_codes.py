"""batchkimi's exit codes, in one place (the summary picks one, the CLI exits with it).

= ================================================================================
0 every row is ``ok``
1 a job-level error (a bad key, the input, the output, the account refused...)
2 usage: an unknown flag, or a flag value of the wrong type
3 finished, but some rows are ``error``, ``invalid`` or ``truncated``
4 stopped at its budget (``max_cost_usd``, ``max_total_tokens``)
5 ``batchkimi compare`` found a regression past its thresholds
6 the account must wait (a quota's Retry-After longer than ``max_wait_s``)
130 interrupted (Ctrl-C, SIGTERM)
= ================================================================================
"""

EXIT_OK = 0
EXIT_JOB_ERROR = 1
EXIT_USAGE = 2
EXIT_FAILED_ROWS = 3
EXIT_BUDGET = 4
EXIT_REGRESSION = 5
EXIT_WAITING = 6
EXIT_INTERRUPTED = 130
