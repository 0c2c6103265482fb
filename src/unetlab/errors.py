"""The one user-facing error type: a single line that names the file and the problem, and what kind it is."""

from __future__ import annotations

from enum import Enum
from pathlib import Path


class ErrorKind(Enum):
    """What sort of problem an error or a dataset problem line is, so that callers sort them without reading
    the message (``unetlab inspect`` groups its problems and picks the fix by kind)."""

    OTHER = "other"
    UNREADABLE = "unreadable"  # missing, empty, truncated or not an image
    SHAPE = "shape"  # a mask's size differs from its image's (or its sibling masks')
    MASK_VALUES = "mask_values"  # values a mask cannot hold: fractional, negative, NaN, beyond the classes
    UNPAIRED = "unpaired"  # an image without a mask or a mask without an image


class UnetlabError(Exception):
    """A mistake in the user's input or setup; the command line prints it as one line and exits with 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None,
                 kind: ErrorKind = ErrorKind.OTHER) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.hint = hint
        self.kind = kind
        text = f"{path}: {message}" if path is not None else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)

    def with_hint(self, more: str) -> UnetlabError:
        """The same error (class, message, file, kind) with ``more`` added to its hint: still one line."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        UnetlabError.__init__(new, self.message, self.path, f"{self.hint}; {more}" if self.hint else more, self.kind)
        return new


class Problem(str):
    """A dataset problem line (a plain ``str`` to everyone else) that also carries its :class:`ErrorKind` and,
    for an image without a mask, that image."""

    kind: ErrorKind
    image: Path | None

    def __new__(cls, text: str, kind: ErrorKind = ErrorKind.OTHER, image: Path | None = None) -> Problem:
        obj = super().__new__(cls, text)
        obj.kind, obj.image = kind, image
        return obj

    def __reduce__(self):  # pickled with its kind (DatasetInfo travels to data-loader workers)
        return (Problem, (str(self), self.kind, self.image))


def kind_of(problem: str | BaseException) -> ErrorKind:
    """The kind of a problem line or an exception (OTHER for plain strings and foreign exceptions)."""
    return getattr(problem, "kind", ErrorKind.OTHER)
