"""Putting a finished directory in place atomically, never replacing one by accident.

A checkpoint is written under a hidden temporary name beside its destination, then published:

* without ``overwrite``: ``renameat2(RENAME_NOREPLACE)``, which fails if the destination
  appeared meanwhile (another convert to the same ``--out``). Plain ``os.rename`` would not do:
  on Linux it silently replaces an existing *empty* directory.
* with ``overwrite``: ``renameat2(RENAME_EXCHANGE)`` swaps the two directories in one step, so
  the destination is at every instant exactly the old or exactly the new checkpoint; the old
  one, now under the temporary name, is deleted afterwards.

Where ``renameat2`` is missing (not Linux, old glibc/kernel, or a filesystem without it) the
fallback is a check-then-``rename`` (no replace) and a two-step swap: the old directory is renamed
aside, the new one renamed in. Both steps run under an exclusive ``flock`` on the parent
directory, which every jaxind writer takes, so two converts cannot interleave; a kill between
the two renames of the swap is repaired by the next run (the aside copy is renamed back).

Temporary names record their writer: ``.tmp-<name>@<host>@<pid>.<start time>@<role>-<random>``.
:func:`clean_stale` removes those whose writer is gone (same host, process no longer running),
so a SIGKILL leaves nothing behind for long; directories of writers on other hosts are left
alone. Each run of the converter calls it for its destination.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator

from absl import logging

from jaxind import testhooks
from jaxind.io import destinations

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
NO_RENAMEAT2_ENV = "JAXIND_TEST_NO_RENAMEAT2"  # tests: take the fallback path


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False where the platform or filesystem
    lacks it. Raises OSError (e.g. FileExistsError) for every other failure."""
    if os.environ.get(NO_RENAMEAT2_ENV) == "1":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


@contextlib.contextmanager
def parent_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on the folder that holds ``path`` (no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: renameat2 is missing too; no lock
        yield
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), telling a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _writer_token() -> str:
    pid = os.getpid()
    start = _start_time(pid)
    return f"{socket.gethostname()}@{pid}" + (f".{start}" if start else "")


def _prefix(dest: str) -> str:
    return f".tmp-{os.path.basename(os.path.abspath(dest))}@"


def _temp_path(dest: str, role: str) -> str:
    """A fresh (not created) temporary path beside ``dest`` for ``role`` (new, old, del)."""
    parent = os.path.dirname(os.path.abspath(dest))
    return os.path.join(parent, f"{_prefix(dest)}{_writer_token()}@{role}-{secrets.token_hex(4)}")


def make_temp_dir(dest: str) -> str:
    """Creates the hidden directory a new ``dest`` is written into (its mode follows the umask)."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{_prefix(dest)}{_writer_token()}@new-", dir=parent)
    os.chmod(tmp, destinations.dir_mode())
    return tmp


def _writer_gone(host: str, proc: str) -> bool:
    """True if the writer ``host``, ``pid[.start]`` ran on this host and is no longer running."""
    pid_text, _, start = proc.partition(".")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(start) and _start_time(pid) not in (None, start)  # the pid now belongs to another process


def _stale_temps(dest: str) -> list[tuple[str, str]]:
    """``(path, role)`` of temporary directories of ``dest`` whose writer is gone."""
    parent = os.path.dirname(os.path.abspath(dest))
    prefix = _prefix(dest)
    found = []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].rsplit("@", 2)  # host, pid[.start], role-random
        if len(parts) == 3 and _writer_gone(parts[0], parts[1]):
            found.append((os.path.join(parent, name), parts[2].split("-", 1)[0]))
    return found


def clean_stale(dest: str) -> list[str]:
    """Repairs and removes what killed writers of ``dest`` left: if ``dest`` is missing and an
    old copy was renamed aside by an interrupted two-step swap, it is renamed back; every other
    stale temporary directory is deleted. Returns the paths removed or restored."""
    dest = os.path.abspath(dest)
    if not os.path.isdir(os.path.dirname(dest)):
        return []
    done = []
    with parent_lock(dest):
        stale = _stale_temps(dest)
        for path, role in stale:
            if role == "old" and not os.path.lexists(dest):
                os.rename(path, dest)
                logging.warning("restored %s from %s (a swap was interrupted)", dest, path)
                done.append(path)
        for path, _ in stale:
            if path not in done:
                shutil.rmtree(path, ignore_errors=True)
                logging.warning("removed %s, left by an interrupted writer", path)
                done.append(path)
    return done


def discard(path: str, dest: str) -> None:
    """Deletes ``path``, an unwanted directory beside ``dest``: renamed to a ``del`` name first,
    so that a kill mid-way leaves something :func:`clean_stale` deletes rather than restores."""
    doomed = _temp_path(dest, "del")
    os.rename(path, doomed)
    testhooks.stop_at("discarding_old")
    shutil.rmtree(doomed, ignore_errors=True)


class DestinationExists(Exception):
    """``dest`` appeared while the new directory was being written (no ``overwrite``)."""


def publish(tmp: str, dest: str, overwrite: bool) -> None:
    """Moves the finished directory ``tmp`` to ``dest`` (see the module docstring).

    Raises:
      DestinationExists: ``dest`` exists (any kind, even an empty directory) and ``overwrite``
        is False; ``tmp`` is left for the caller to remove.
    """
    with parent_lock(dest):
        try:
            _rename_noreplace(tmp, dest)
            return
        except FileExistsError:
            if not overwrite:
                raise DestinationExists(dest) from None
        old = _swap(tmp, dest)
        testhooks.stop_at("swapped")
        discard(old, dest)


def _rename_noreplace(src: str, dst: str) -> None:
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):  # fallback: atomic against other jaxind writers (the lock)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _swap(new: str, dest: str) -> str:
    """Puts ``new`` at ``dest``; returns the path that now holds the old ``dest``."""
    if _renameat2(new, dest, _RENAME_EXCHANGE):
        return new
    aside = _temp_path(dest, "old")
    os.rename(dest, aside)
    testhooks.stop_at("moved_aside")
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    return aside
