"""Atomic file output: every file unetlab writes goes through here (write a temporary, then rename).

A leaf module (it imports nothing of unetlab but :mod:`unetlab.errors`) so that every stage can use it.
A full disk, a quota or a folder without write permission is one :class:`UnetlabError` line; a killed process
leaves at most a temporary ``.<stem>.<8 chars>.tmp<suffix>`` that :func:`remove_stale_temporaries` deletes.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UnetlabError

_WRITE_ERRNOS = {
    errno.ENOSPC: "free some disk space, or write somewhere else",
    errno.EDQUOT: "free some space in your quota, or write somewhere else",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EROFS: "the disk is read-only: choose another folder",
}
_STALE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def atomic_path(path: str | Path) -> Path:
    """A fresh temporary path in the same folder as ``path`` (same suffix), for write-then-rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_error(exc: OSError, path: str | Path) -> UnetlabError | None:
    """The one-line user error for a full disk, quota or permission problem; None for other OS errors."""
    if exc.errno not in _WRITE_ERRNOS:
        return None
    return UnetlabError(f"cannot write: {exc.strerror or exc}", path, _WRITE_ERRNOS[exc.errno])


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it onto ``path``, on any failure delete it."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_path(path)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        err = write_error(exc, path)
        if err is None:
            raise
        raise err from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` (a directory output such as
    an OME-Zarr image), on any failure it is deleted. An old ``path`` is moved aside first, then deleted."""
    import shutil

    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        err = write_error(exc, path)
        if err is None:
            raise
        raise err from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(path: str | Path, suffix: str, overwrite: bool = False) -> Path:
    """``path`` as a new output file: refused (one line) when it is a folder, does not end in ``suffix`` (e.g.
    ``.png``) or exists without ``overwrite``; the rule of every command that writes one picture to ``--out``."""
    path = Path(path)
    if path.is_dir():
        raise UnetlabError(f"--out is a folder, not a {suffix} file", path, f"e.g. --out {path / ('out' + suffix)}")
    if path.suffix.lower() != suffix:
        raise UnetlabError(f"--out must be a {suffix} file", path, f"e.g. --out {path.parent / (path.stem + suffix)}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UnetlabError("output exists", path, "pass --overwrite to replace it")
    return path


def write_atomic(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` then rename the temporary file onto ``path`` (never a half-written file)."""
    with atomic_output(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    """Write a binary file atomically; ``fsync`` flushes it to disk before the rename (checkpoints)."""

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    return write_atomic(path, _write)


@functools.cache
def _umask() -> int:
    """The process umask, read once (by setting and restoring it, which is not thread-safe to repeat)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries that a killed process left behind under ``folder`` (only names of their form)."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    import shutil

    for p in sorted(folder.rglob(".*.tmp*")):
        if p.is_dir() and _STALE.match(p.name):  # an unfinished directory output (atomic_directory)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.is_file() and (_STALE.match(p.name) or (p.name.endswith(".data") and _STALE.match(p.name[:-5]))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def remove_entries(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the entries ``names`` (files or folders) of ``folder``, or all of them when ``names`` is None: what
    ``--overwrite`` does to an earlier output before a new one is written, so none of it outlives the command."""
    import shutil

    folder = Path(folder)
    entries = sorted(folder.iterdir()) if names is None else [folder / n for n in names]
    removed = []
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(p)
    return removed
