"""The one exception family of qplan: caught once, in the CLI, and turned into an exit code."""

from __future__ import annotations


class QplanError(Exception):
    """A problem the user can fix; the message names the problem and the fix in one line."""

    exit_code = 1


class UsageError(QplanError):
    """Bad command-line input (a malformed size, an unknown GPU name, nonsense headroom)."""

    exit_code = 2


class ModelNotFoundError(QplanError):
    """The model could not be resolved from disk, the catalog, the HF cache or the Hub."""


class ConfigError(QplanError):
    """A config.json that is malformed, incomplete, or names an unknown architecture."""


class DeviceError(QplanError):
    """No usable NVIDIA driver / device where one was needed."""


class ModelCodeError(QplanError):
    """The model's own code (the installed transformers) fails on the step planned, so a
    real run would fail the same way: nothing to plan for that workload."""
