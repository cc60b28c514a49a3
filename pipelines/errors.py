"""Project errors. Each subclasses a builtin so callers can catch either; all share the root
``ForgetlessError`` (``storage.errors``), which the CLI turns into one line and exit status 2."""

from __future__ import annotations

from storage.errors import ForgetlessError, StorageError

__all__ = ["ConfigError", "DataError", "ForgetlessError", "NonFiniteLossError", "StorageError"]


class ConfigError(ForgetlessError, ValueError):
    """The run configuration is invalid. ``problems`` lists each one with its dotted path."""

    def __init__(self, message: str, *, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class DataError(ForgetlessError, ValueError):
    """A task's data is missing, empty or malformed. The message names the file and row."""


class NonFiniteLossError(ForgetlessError, FloatingPointError):
    """Training produced a NaN or infinite loss."""

    def __init__(self, task: str, step: int, loss: float):
        super().__init__(
            f"non-finite loss ({loss}) in task {task!r} at step {step}; lower training.lr, "
            "set training.grad_clip, or check that task's data"
        )
        self.task, self.step, self.loss = task, step, loss
