"""Atomic file writes: temporary name in the destination directory, fsync, rename.

Every product photref writes (master, statistics table, flux table, plots) goes through here, so a reader
sees either the old file or the complete new one, never a partial one; on any failure the temporary file
is removed and an existing file is left untouched. Temporaries of killed writers are cleaned up by the next
write of the same file.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import secrets
import warnings

__all__ = [
    "atomic_path",
    "atomic_savefig",
    "atomic_stream",
    "atomic_write",
    "atomic_writeto",
    "fsync_directory",
    "pid_alive",
    "remove_stale_temporaries",
]


def fsync_directory(directory: pathlib.Path) -> None:
    """Flush a directory entry to disk (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_name(path: pathlib.Path) -> pathlib.Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}"


def remove_stale_temporaries(path) -> list[str]:
    """Remove temporary files of ``path`` left by writers that died (their process no longer exists).

    A writer killed between creating its temporary file and renaming it leaves
    ``.NAME.tmp-PID-RANDOM`` behind; the next write of the same file removes it.
    """
    path = pathlib.Path(os.path.abspath(os.fspath(path)))
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        try:
            pid = int(tmp.name[len(path.name) + 6 :].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(str(tmp))
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = True):
    """A temporary file name whose file replaces ``path`` atomically when the block ends well: in the
    destination directory, fsynced, then renamed over ``path``. On an exception the temporary file is
    removed and an existing file is left untouched. For writers that write by name, a piece at a time
    (FITS HDUs appended one by one); :func:`atomic_stream` opens it as a stream.

    Parameters
    ----------
    path : str or os.PathLike
        The destination (its directory is created if missing).
    overwrite : bool
        Replace an existing file; when false an existing file raises :class:`FileExistsError` (checked
        atomically: the new file is linked into place only if the name is free).

    Yields
    ------
    str
        The temporary file's name (not created yet: the block creates it).
    """
    path = pathlib.Path(os.path.abspath(os.fspath(path)))
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: exists and overwrite is false")
    remove_stale_temporaries(path)
    tmp = _temporary_name(path)
    try:
        yield str(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data of every descriptor the block wrote through
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name was taken meanwhile
            except FileExistsError:
                raise FileExistsError(f"{path}: exists and overwrite is false") from None
            except OSError:  # no hard links on this file system
                if path.exists():
                    raise FileExistsError(f"{path}: exists and overwrite is false") from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_directory(directory)


@contextlib.contextmanager
def atomic_stream(path, overwrite: bool = True):
    """A binary stream (seekable) whose content replaces ``path`` atomically when the block ends well
    (:func:`atomic_path`: a temporary file in the destination directory, fsynced and renamed over
    ``path``; on an exception removed, an existing file left untouched).

    Parameters
    ----------
    path : str or os.PathLike
        The destination (its directory is created if missing).
    overwrite : bool
        As :func:`atomic_path`.

    Yields
    ------
    io.BufferedWriter
        The temporary file, open for writing.
    """
    with atomic_path(path, overwrite) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as stream:
            yield stream


def atomic_write(path, write, overwrite: bool = True) -> pathlib.Path:
    """Write a file atomically: ``write(stream)`` fills the stream of :func:`atomic_stream`, so a reader
    sees the old file or the whole new one.

    Parameters
    ----------
    path : str or os.PathLike
        The destination (its directory is created if missing).
    write : callable
        ``write(stream)`` writes the content to a binary stream.
    overwrite : bool
        As :func:`atomic_stream`.

    Returns
    -------
    pathlib.Path
        The absolute destination path.
    """
    with atomic_stream(path, overwrite) as stream:
        write(stream)
    return pathlib.Path(os.path.abspath(os.fspath(path)))


def atomic_writeto(hdul, path, overwrite: bool = True) -> pathlib.Path:
    """Write an ``astropy.io.fits.HDUList`` atomically (see :func:`atomic_write`), with checksums."""

    def write(stream):
        with warnings.catch_warnings():
            # A long FITTERMS or STORE continues over CONTINUE cards and astropy shortens its
            # comment, warning each time: expected, and the value itself is kept whole.
            warnings.filterwarnings("ignore", message="Card is too long, comment will be truncated")
            hdul.writeto(stream, checksum=True)

    return atomic_write(path, write, overwrite)


def atomic_savefig(figure, path, **kwargs) -> pathlib.Path:
    """Save a matplotlib figure as PNG atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda stream: figure.savefig(stream, format="png", **kwargs))
