"""Where outputs go: checks that a destination can be written, made before any work starts,
the file mode new outputs get, and the one way results, reports and pictures are written
(:func:`write_file`: atomically, to the file the user named).

A symlink is written through: its final target is replaced atomically and the link stays a
link. Anything that is not a regular file is refused with one line, never replaced: a device,
a FIFO, a socket, and any path that leads into ``/proc`` or ``/sys`` (``/dev/stdout`` is the
link ``/proc/self/fd/1``: the shell's redirection, not a file jaxind may replace).

A check does not trust permission bits (root ignores them, and read-only mounts, immutable
directories and /proc refuse writes whatever the bits say): it creates and removes a small
probe file in the folder that would receive the output.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable

from jaxind.errors import JaxindError

__all__ = [
    "check_directory",
    "check_file",
    "dir_mode",
    "file_mode",
    "resolve_output",
    "umask",
    "write_file",
    "write_text",
]

_MAX_LINKS = 40  # as Linux's ELOOP limit
_KERNEL_TREES = ("/proc/", "/sys/")  # magic links (/dev/stdout -> /proc/self/fd/1) and kernel files


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


def _refuse_special(path: str, shown: str, flag: str) -> None:
    """A one-line JaxindError for an output that is not a file jaxind may replace."""
    raise JaxindError(
        f"{flag}={shown} is not a regular file ({path}: a device, pipe, socket or kernel file): outputs are "
        f"written atomically and never replace such a file; name a file, e.g. {flag}=results.json, and read it "
        "from there (a shell redirection such as /dev/stdout is not one)"
    )


def resolve_output(path: str, flag: str = "--output") -> str:
    """The file an output named ``path`` is written to: ``path`` with every symlink (of the file and of
    its folders) followed to its final target, which need not exist yet.

    Raises:
      JaxindError: ``path`` is empty, a link loop, or leads to something that is not a regular file
      (a device, FIFO, socket, directory, or anything under /proc or /sys).
    """
    if not path:
        raise JaxindError(f"{flag}= is empty: name a file, e.g. {flag}=results.json, or leave the flag out")
    current = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        current = os.path.join(os.path.realpath(os.path.dirname(current)), os.path.basename(current))
        if current.startswith(_KERNEL_TREES) and os.path.lexists(current):
            _refuse_special(current, path, flag)
        if not os.path.islink(current):
            break
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    else:
        raise JaxindError(f"{flag}={path}: too many levels of symbolic links; name a file")
    try:
        mode = os.stat(current).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new file; a folder that is a file is refused later
        return current
    except OSError as e:
        raise JaxindError(f"{flag}={path} cannot be written ({e.strerror}): choose another path") from None
    if stat.S_ISDIR(mode):
        raise JaxindError(f"{flag}={path} is a directory: pass a file name, e.g. {os.path.join(path, 'results.json')}")
    if not stat.S_ISREG(mode):
        _refuse_special(current, path, flag)
    return current


def check_file(path: str, flag: str = "--output") -> None:
    """Raises a one-line JaxindError unless a file can be written (atomically replaced) at ``path``.

    Refused: an empty path, a directory, a path ending in a separator, something that is not a
    regular file (a device, a FIFO, /dev/stdout), a path under a regular file, a folder where files
    cannot be created. A symlink is checked at its final target (which is what gets written).
    """
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise JaxindError(f"{flag}={path} is a directory: pass a file name, e.g. {os.path.join(path, 'results.json')}")
    target = resolve_output(path, flag)
    _check_folder(os.path.dirname(target), flag, path)


def write_file(path: str, write: Callable[[str], None], flag: str = "--output") -> str:
    """Writes an output atomically to the file ``path`` names; returns that file's real path.

    ``write(tmp)`` fills a temporary file in the target's folder (named like the target, same
    extension); it is fsynced, given the mode a plain ``open()`` would give (``0o666`` less the umask)
    and renamed over the target. A symlink at ``path`` is written through (its target is replaced; the
    link stays); a special file is refused (:func:`resolve_output`). On failure the temporary is removed.
    """
    target = resolve_output(path, flag)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(target)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}@", suffix=os.path.splitext(name)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return target


def write_text(path: str, text: str, flag: str = "--output") -> str:
    """:func:`write_file` of ``text`` (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_file(path, write, flag)


def check_directory(path: str, flag: str, in_place: bool = True) -> None:
    """Raises a one-line JaxindError unless a directory can be written at ``path``.

    ``in_place``: files are written inside ``path`` (it may exist); otherwise the directory is
    built beside it and renamed into place, so its parent folder must take new entries.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise JaxindError(f"{flag}={path} is a file, not a directory: choose another path")
    target = path if (in_place and os.path.isdir(path)) else os.path.dirname(os.path.abspath(path))
    _check_folder(target, flag, path)
