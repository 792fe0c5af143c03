"""Errors shared by the library and the command-line scripts (so neither imports the other)."""

from __future__ import annotations

__all__ = ["ConfigError", "TrainingStopped"]


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the problem and the fix."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what is kept and what to change."""
