"""Where outputs go: checks that a destination can be written, made before any work starts,
and the file mode new outputs get.

A check does not trust permission bits (root ignores them, and read-only mounts, immutable
directories and /proc refuse writes whatever the bits say): it creates and removes a small
probe file in the folder that would receive the output.
"""

from __future__ import annotations

import os
import tempfile

from jaxind.errors import JaxindError


def umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file (``0o666`` less the umask); ``mkstemp`` gives 0600."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory (``0o777`` less the umask); ``mkdtemp`` gives 0700."""
    return 0o777 & ~umask()


def _nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe(folder: str, flag: str, value: str) -> None:
    """Creates and removes a file in ``folder``; a failure becomes a JaxindError."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxind-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise JaxindError(
            f"{flag}={value} cannot be written: creating a file in {folder} failed "
            f"({e.strerror or type(e).__name__}): choose a writable location"
        ) from None


def _check_folder(folder: str, flag: str, value: str) -> None:
    """``folder`` exists as a writable directory, or can be created under one."""
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise JaxindError(
            f"{flag}={value} cannot be created: {existing} is a file, not a directory; choose a path under a directory"
        )
    _probe(existing, flag, value)


def check_file(path: str, flag: str = "--output") -> None:
    """Raises a one-line JaxindError unless a file can be written (atomically replaced) at ``path``.

    Refused: a directory, a path ending in a separator, something that is not a regular file
    (a device, a FIFO), a path under a regular file, a folder where files cannot be created.
    """
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise JaxindError(f"{flag}={path} is a directory: pass a file name, e.g. {os.path.join(path, 'results.json')}")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise JaxindError(f"{flag}={path} exists and is not a regular file: pass a file name")
    _check_folder(os.path.dirname(os.path.abspath(path)), flag, path)


def check_directory(path: str, flag: str, in_place: bool = True) -> None:
    """Raises a one-line JaxindError unless a directory can be written at ``path``.

    ``in_place``: files are written inside ``path`` (it may exist); otherwise the directory is
    built beside it and renamed into place, so its parent folder must take new entries.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise JaxindError(f"{flag}={path} is a file, not a directory: choose another path")
    target = path if (in_place and os.path.isdir(path)) else os.path.dirname(os.path.abspath(path))
    _check_folder(target, flag, path)
