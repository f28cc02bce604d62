"""Exceptions with messages that name exactly where the problem is."""

from __future__ import annotations

from pathlib import Path


class LabelmatchError(Exception):
    """Base class for every error labelmatch raises on purpose (the CLI prints these in one line)."""


class DataError(LabelmatchError, ValueError):
    """Bad input data: names the file, the line (1-based) and the field at fault.

    Args:
        path: The file the problem was found in.
        message: What is wrong, in plain words.
        line: 1-based line number, when the problem is on one line.
        field: The JSON field / column at fault, when there is one.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {self.reason}")

    @property
    def reason(self) -> str:
        """The problem without its place in the file: ``field 'x': message`` (or the message)."""
        return f"field '{self.field}': {self.message}" if self.field else self.message


class ArtifactError(LabelmatchError):
    """An artifact directory is missing, of the wrong kind, or fails digest verification."""


class ConfigError(LabelmatchError, ValueError):
    """A configuration value (hyper-parameter, search space, flag) is invalid."""
