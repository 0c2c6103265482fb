"""The one user-facing error type: a single line that names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class UnetlabError(Exception):
    """A mistake in the user's input or setup; the command line prints it as one line and exits with 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.hint = hint
        text = f"{path}: {message}" if path is not None else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)
