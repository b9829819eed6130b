"""User-facing errors.

A :class:`DistillError` is a problem with the user's input (a config, a path, a model) that the user can fix.
The CLI prints its message as one sentence and exits with status 2; it never prints a traceback for it.
"""

from __future__ import annotations


class DistillError(Exception):
    """An input problem with a message that names the problem and the fix."""


class ConfigError(DistillError):
    """One or more problems in a recipe config; ``errors`` lists all of them."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source} has {len(self.errors)} problem(s):\n{lines}")
