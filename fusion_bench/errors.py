"""The project's exception classes.

Every error a user can cause (bad config, bad model, bad dataset) is raised as a
:class:`FusionBenchError` subclass with a one-line message that quotes the offending
item. The CLI prints such errors as one line and exits with status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "FusionBenchError",
    "ConfigError",
    "UnknownNameError",
    "ModelLoadError",
    "ModelPoolError",
    "DatasetError",
    "IncompatibleModelsError",
]


class FusionBenchError(Exception):
    """Base class of all errors caused by user input."""


class ConfigError(FusionBenchError, ValueError):
    """An option has a wrong value or type."""


class UnknownNameError(FusionBenchError, KeyError):
    """A name (method, pool, task, model) is not known; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(FusionBenchError, OSError):
    """A model, processor or checkpoint cannot be found or is of the wrong kind."""


class ModelPoolError(FusionBenchError, ValueError):
    """The model pool's configuration is inconsistent."""


class DatasetError(FusionBenchError, ValueError):
    """A dataset cannot be loaded or lacks what the task needs (columns, labels)."""


class IncompatibleModelsError(FusionBenchError, ValueError):
    """Models in a pool differ in keys, shapes or dtypes where a merge needs them equal."""
