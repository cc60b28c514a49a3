"""The root of every error Forgetless raises on purpose, at the bottom layer so every package's
errors share it: the CLI turns any of them into one line and exit status 2.

Each project error also subclasses a builtin (``ValueError``, ``OSError``, ...), so callers can
catch either.
"""

from __future__ import annotations


class ForgetlessError(Exception):
    """Base of every error this project raises on purpose."""


class StorageError(ForgetlessError):
    """Base of the storage package's errors."""
