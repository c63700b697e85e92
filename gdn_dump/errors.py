"""The tool's own error types.

Every mistake a user can make ends as one of these; the CLI turns it into one line on stderr and
its exit code (2 for usage errors, 1 for runtime failures), with no traceback unless ``--debug``.
"""

from __future__ import annotations


class GdnDumpError(Exception):
    """A usage error: bad input, bad option, bad environment. Exit code 2."""

    exit_code = 2


class PromptFileError(GdnDumpError):
    """The prompt file cannot be read as asked (missing, empty, bad encoding, bad jsonl line)."""


class SelectionError(GdnDumpError):
    """An unknown hook or layer, or an empty selection."""


class StoreError(GdnDumpError):
    """The output store cannot be used as asked (exists, not writable, incompatible)."""


class RunFailure(GdnDumpError):
    """A failure during the run (disk full, non-finite values with --fail-on-nonfinite). Exit code 1."""

    exit_code = 1


class Terminated(BaseException):
    """SIGTERM arrived (Slurm preemption, ``kill``): flush, record progress, exit 143."""

    exit_code = 143
