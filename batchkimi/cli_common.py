"""What every CLI module shares: the error that exits with a job error's code."""

from __future__ import annotations

import click

from .exit_codes import EXIT_JOB_ERROR, EXIT_REGRESSION

__all__ = ["EXIT_REGRESSION", "Fail"]


class Fail(click.ClickException):
    """A known job-level problem: one line, exit code 1."""

    exit_code = EXIT_JOB_ERROR
