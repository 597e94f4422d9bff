"""The CLI's one kind of failure a user can cause or meet, and how it is shown: one line.

Apart from ``jobs/cli.py`` so that what the CLI calls (``jobs/monitor.py``) raises it without
importing the CLI back.
"""

from __future__ import annotations

EXIT_USAGE = 2  # the user's input is wrong (click's own code for usage errors)
EXIT_FAILED = 1  # the cluster, the storage or the job failed


class CliError(Exception):
    """A failure to report as one line; ``exit_code`` 2 for bad input, 1 for everything else."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: str) -> str:
    """``text`` on one line, without credentials: every error line goes through here."""
    from pipeline.storage import redact

    return redact(" ".join(str(text).split()))
