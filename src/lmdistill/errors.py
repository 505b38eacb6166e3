"""The one error family lmdistill raises for bad user input.

The command line prints these as one clear message (no traceback) and exits with status 2.
"""

from __future__ import annotations


class LmdistillError(Exception):
    """Base class: a problem the user can fix (bad file, bad config, unreachable model)."""


class ConfigError(LmdistillError):
    """A recipe or command-line setting is wrong."""


class ModelLoadError(LmdistillError):
    """A model or tokenizer could not be loaded (missing folder, unreachable hub id)."""


class DataError(LmdistillError):
    """Bad rows in an instruction-data file.

    ``problems`` holds every ``Problem`` found; the message lists them as
    ``file:line: field "x" ...`` so the user can jump to each one.
    """

    def __init__(self, problems: list["Problem"], limit: int = 20):
        self.problems = list(problems)
        shown = [str(p) for p in self.problems[:limit]]
        more = len(self.problems) - len(shown)
        if more > 0:
            shown.append(f"... and {more} more problem(s)")
        super().__init__("\n".join(shown))


class Problem:
    """One bad row: where it is and what is wrong."""

    __slots__ = ("path", "line", "field", "message")

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = path, line, field, message

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        what = f'field "{self.field}" {self.message}' if self.field else self.message
        return f"{where}: {what}"

    def __repr__(self) -> str:
        return f"Problem({str(self)!r})"


class StorageError(LmdistillError):
    """A write failed (full disk, no permission, read-only filesystem); the message names the path, the reason
    and what is left intact. ``path`` and ``errno`` say which write failed and why (None when unknown)."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path, self.errno = path, errno


class Stopped(LmdistillError):
    """The work stopped on a signal (SIGTERM, SIGINT) after keeping what it had done; the message says what was
    kept and how to continue. The command line exits with ``exit_code`` (128 + the signal: 143, 130)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
