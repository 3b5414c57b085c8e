"""Errors a user can act on.

Every error raised for bad input is a :class:`TrnftError`: the CLI prints its message as one line and
exits with its ``exit_code``. Internal invariants use ``assert``; anything else escaping a stage is a bug.
"""

from __future__ import annotations


class TrnftError(Exception):
    """A user-facing error: bad config, bad input files, a missing upstream stage.

    The message must be one line that names the key, file or tensor and says what to do.
    """

    exit_code = 1


class ConfigError(TrnftError):
    """The run config (YAML or a ``key=value`` override) is invalid."""

    exit_code = 2


class UpstreamError(TrnftError):
    """A stage was started before the stage it reads from completed."""


class ProcessFailed(TrnftError):
    """A process this one started failed; ``exit_code`` is that process's, so its class (permanent or
    retryable, :mod:`trnft.common.exits`) reaches the cluster unchanged."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
