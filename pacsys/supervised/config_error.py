"""ConfigError, the one exception of configuration, and the wording its messages share.

Its own module so that the settings (`config`) and the policy tables (`policy_config`) both
raise it without importing each other in a circle.
"""

from __future__ import annotations

__all__ = ["ConfigError", "range_text"]


class ConfigError(ValueError):
    """A bad setting. `key` names the setting (or ``policies[i]``) when there is one."""

    def __init__(self, message: str, key: str | None = None, body: str | None = None):
        super().__init__(message)
        self.key = key
        self.body = body


def range_text(lo: float | None, hi: float | None, gt: float | None) -> str:
    """The bounds of a number for an error message: " from 1 to 5", " > 0", " >= 1" or ""."""
    if lo is not None and hi is not None:
        return f" from {lo:g} to {hi:g}"
    if gt is not None:
        return f" > {gt:g}"
    if lo is not None:
        return f" >= {lo:g}"
    if hi is not None:
        return f" <= {hi:g}"
    return ""
