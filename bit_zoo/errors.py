"""Errors shared by the library and the command-line scripts (so neither imports the other)."""

from __future__ import annotations

__all__ = ["ConfigError", "FetchError", "TrainingInterrupted", "TrainingStopped"]


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the problem and the fix."""


class FetchError(RuntimeError):
    """Weights or data could not be fetched or stored remotely (unreachable, refused, corrupt on arrival);
    the message names the location and what to set or retry. The scripts report it in one line."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what is kept and what to change."""


class TrainingInterrupted(TrainingStopped):
    """Training stopped on SIGTERM or SIGINT after saving a resumable checkpoint; ``signum`` is the signal
    (the scripts exit 128 + signum, as a process killed by it would), ``checkpoint`` the file saved."""

    def __init__(self, message: str, *, signum: int, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
