"""The jaxind cache on disk: content hashes of model sources, and entries (directories) that are
written once, published atomically and read many times (docs/DESIGN.md §5.10).

Layout under the cache root (``$JAXIND_CACHE``, default ``~/.cache/jaxind``)::

    hashes/<signature>.txt        content hash of a model source, memoised by its files' stat (ctime included)
    models/<model key>/           a converted model: config.json, meta.json, weights/tree.json, weights/leaves/*.npy
    fingerprints/<key>/           a model's fingerprint on a token set (jaxind.stats.fingerprint)
    jax/                          JAX's persistent compilation cache (jaxind.cli.cli_utils)

**Why content hashes, memoised by stat.** A model is identified by the bytes of its source files
(every regular file of a directory, or the ``.gguf`` file), so two paths to the same model share
their cache entries and an edited model never reuses a stale one. Hashing reads the files once
(about the cost of the conversion that a cache hit then skips); the result is memoised under a
signature of the files' paths, sizes, mtimes, ctimes, inodes and devices, so later lookups cost one
``stat`` per file. The ctime is what makes the memo safe: any write to a file moves it, and unlike
the mtime it cannot be set back (``touch -r``, ``cp -p``, ``rsync -t`` restore mtimes). A file whose
ctime is less than :data:`MEMO_MIN_AGE_S` old when it is hashed is not memoised (a second write in
the same clock tick would leave its stat unchanged: git's "racily clean" case), and a file whose
stat changes while it is read is hashed again next time. A hash of the param arrays would need
the conversion before the lookup, which is the work the cache exists to skip.

**Verified entries.** Every stored array records a checksum of its bytes (:func:`checksum`, CRC-32,
about 2 GB/s per core); reading an entry recomputes the checksums of the arrays it uses (once per
file per process: :func:`verify_array` remembers what it verified by the file's stat) and anything
that does not verify or cannot be read raises :class:`DamagedEntry`. The owner of the entry then
moves it aside atomically (:func:`discard`, under the entry's lock), logs one warning naming it,
and rebuilds it. A cache makes a run faster, never different.

**Atomic entries.** An entry is built in a hidden sibling directory named after its writer
(``.tmp-<key>@<host>@<pid>@<random>``), its files fsynced, then renamed into place; an entry
that exists is complete. A writer killed mid-way leaves only the hidden directory, which is never
read and is removed by the next writer once its process is gone. A lock file per entry
(``fcntl.flock``) makes concurrent processes (``--workers``, shards on one cache) compute an entry
once: the others wait, then read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from jaxind.errors import JaxindError
from jaxind.io import assets, destinations

__all__ = [
    "DamagedEntry",
    "HASH_VERSION",
    "MEMO_MIN_AGE_S",
    "check_writable",
    "checksum",
    "clean_stale",
    "content_hash",
    "discard",
    "key_of",
    "load_tree",
    "lock",
    "make_temp",
    "publish",
    "read_json_entry",
    "root",
    "save_tree",
    "verify_array",
    "write_text",
]

HASH_VERSION = 2  # 2: the memo's stat signature includes ctime and device
MEMO_MIN_AGE_S = 1.0
_CHUNK = 1 << 24


class DamagedEntry(JaxindError):
    """A cache entry that cannot be read or does not verify (its owner discards and rebuilds it)."""


_NPY_HEADER_LOCK = threading.Lock()  # leaves are read in threads (load_tree)


def root(override: str | None = None) -> str:
    """The cache root: ``override``, else ``$JAXIND_CACHE``, else ``~/.cache/jaxind``."""
    return os.path.abspath(os.path.expanduser(override or assets.cache_dir()))


def key_of(**parts: Any) -> str:
    """A stable hex key (sha256, 32 hex digits) of JSON-serialisable ``parts``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _files(path: str) -> list[tuple[str, str]]:
    """``[(relative name, absolute path)]`` of the regular files making up a source, sorted."""
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    out = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            full = os.path.join(folder, name)
            if not name.startswith(".") and os.path.isfile(full):
                out.append((os.path.relpath(full, path), full))
    return sorted(out)


def _signature(files: list[tuple[str, str]]) -> list[tuple[str, int, int, int, int, int]]:
    """``[(name, size, mtime_ns, ctime_ns, inode, device)]`` of ``files``."""
    stats = ((name, os.stat(full)) for name, full in files)
    return [(n, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev) for n, st in stats]


def content_hash(path: str, cache_root: str | None = None) -> str:
    """sha256 (hex) of a model source's files: names, sizes and bytes, in name order.

    Memoised under ``hashes/`` by the files' stat signature (:func:`_signature`, ctime included), so a
    second call reads no data; files changed less than :data:`MEMO_MIN_AGE_S` ago are not memoised.

    Raises:
      JaxindError: the path has no files.
    """
    path = os.path.abspath(path)
    files = _files(path)
    if not files:
        raise JaxindError(f"model source {path} has no files to read")
    signature = _signature(files)
    memo = os.path.join(root(cache_root), "hashes", key_of(v=HASH_VERSION, path=path, files=signature) + ".txt")
    with contextlib.suppress(OSError):
        with open(memo) as f:
            known = f.read().strip()
        if len(known) == 64:
            return known
    started = time.time_ns()
    digest = hashlib.sha256()
    for name, full in files:
        digest.update(f"{name}\0{os.path.getsize(full)}\0".encode())
        with open(full, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    value = digest.hexdigest()
    settled = all(started - ctime >= MEMO_MIN_AGE_S * 1e9 for _, _, _, ctime, _, _ in signature)
    if settled and _signature(files) == signature:  # not changed while read, not racily recent
        with contextlib.suppress(OSError):
            write_text(memo, value)
    return value


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (temporary file beside it, fsync, rename)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}@{socket.gethostname()}@{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def lock(path: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path + ".lock"`` (waits for other holders)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _temp_prefix(final: str) -> str:
    return f".tmp-{os.path.basename(final)}@"


def make_temp(final: str) -> str:
    """A fresh hidden directory beside ``final`` naming this writer (host and pid)."""
    folder = os.path.dirname(final)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{_temp_prefix(final)}{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp, destinations.dir_mode())
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: str) -> list[str]:
    """Removes hidden directories of ``final`` left by dead writers on this host; returns them."""
    folder, prefix, host = os.path.dirname(final), _temp_prefix(final), socket.gethostname()
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("@")
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                removed.append(os.path.join(folder, name))
    return removed


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            _fsync_tree(path)
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, final: str) -> bool:
    """Renames the finished ``tmp`` directory to ``final`` (after fsyncing it); if another writer
    published ``final`` first, discards ``tmp`` and returns False."""
    _fsync_tree(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def discard(final: str, why: str) -> None:
    """Moves the damaged entry ``final`` aside by one rename (readers see it whole or not at all),
    deletes it and logs one warning naming it; the caller holds the entry's lock and rebuilds it."""
    logging.warning("cache entry %s is damaged (%s): discarding it and rebuilding", final, why)
    aside = make_temp(final)
    os.rename(final, aside + "/entry")  # the writer's own hidden name: cleaned up like a killed writer's
    shutil.rmtree(aside, ignore_errors=True)


def check_writable(folder: str, what: str) -> None:
    """Raises a one-line :class:`JaxindError` unless files can be created in ``folder`` (created if missing)."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe@{socket.gethostname()}@{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        why = "not a directory" if os.path.lexists(folder) and not os.path.isdir(folder) else e.strerror or e
        raise JaxindError(
            f"{what} {folder} is not writable ({why}): point --cache_dir (or $JAXIND_CACHE) at a "
            "writable disk with room"
        ) from None


def checksum(array: np.ndarray) -> str:
    """``"crc32:<8 hex>"`` of an array's bytes in C order (reads it once, about 2 GB/s per core)."""
    array = np.ascontiguousarray(array)
    return f"crc32:{zlib.crc32(array.reshape(-1).view(np.uint8).data) & 0xFFFFFFFF:08x}"


_verified: dict[tuple[str, int, int, int, int, int], str] = {}


def verify_array(path: str, expected: str | None, *, mmap: bool = True) -> np.ndarray:
    """``np.load(path)`` (memory-mapped when ``mmap``), its bytes checked against the checksum
    ``expected`` once per process and file version (stat signature, ctime included).

    Raises:
      DamagedEntry: unreadable, no recorded checksum, or a checksum that differs.
    """
    if not expected:
        raise DamagedEntry(f"{os.path.basename(path)} has no recorded checksum (written by an older jaxind)")
    try:
        st = os.stat(path)
        with _NPY_HEADER_LOCK:  # CPython 3.11's ast is not thread-safe: np.load parses the header with it
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DamagedEntry(f"cannot read {os.path.basename(path)}: {type(e).__name__}: {e}") from None
    stamp = (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    if _verified.get(stamp) != expected:
        found = checksum(array)
        if found != expected:
            raise DamagedEntry(f"{os.path.basename(path)} has checksum {found}, recorded {expected}")
        _verified[stamp] = expected
    return array


def read_json_entry(path: str) -> Any:
    """A cache entry's JSON file.

    Raises:
      DamagedEntry: missing, unreadable or not JSON.
    """
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"cannot read {os.path.basename(path)}: {type(e).__name__}: {e}") from None


# --- param trees as .npy files (layout-agnostic: paths of dict keys and sequence indices) ---


def _path_json(path: tuple) -> list[list[Any]]:
    out: list[list[Any]] = []
    for entry in path:
        if hasattr(entry, "key"):
            out.append(["k", entry.key])
        elif hasattr(entry, "idx"):
            out.append(["i", int(entry.idx)])
        else:
            raise JaxindError(f"cannot store a param tree with a {type(entry).__name__} node")
    return out


def save_tree(folder: str, tree: Any) -> int:
    """Writes every leaf of a nested dict/list tree as ``leaves/<i>.npy`` plus ``tree.json`` (the
    leaves' paths, dtypes, shapes and checksums); returns the bytes written. bfloat16 leaves are
    stored as their uint16 bits."""
    import jax

    os.makedirs(os.path.join(folder, "leaves"), exist_ok=True)
    records, total = [], 0
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        array = np.ascontiguousarray(np.asarray(leaf))
        dtype = str(array.dtype)
        if dtype == "bfloat16":
            array = array.view(np.uint16)
        np.save(os.path.join(folder, "leaves", f"{i}.npy"), array)
        records.append({"path": _path_json(path), "dtype": dtype, "shape": list(array.shape), "sum": checksum(array)})
        total += array.nbytes
    with open(os.path.join(folder, "tree.json"), "w") as f:
        json.dump(records, f)
    return total


def load_tree(folder: str, mmap: bool = True) -> Any:
    """The tree :func:`save_tree` wrote, leaves as (memory-mapped) numpy arrays, every leaf's
    checksum verified (leaves in parallel threads: CRC-32 releases the GIL).

    Raises:
      DamagedEntry: ``tree.json`` or a leaf is missing, unreadable, mis-shaped or does not verify.
    """
    records = read_json_entry(os.path.join(folder, "tree.json"))
    try:
        paths = [(r["path"], str(r["dtype"]), list(r["shape"]), r.get("sum")) for r in records]
    except (TypeError, KeyError, AttributeError) as e:
        raise DamagedEntry(f"tree.json is malformed ({type(e).__name__}: {e})") from None

    def read(i: int) -> np.ndarray:
        _, dtype, shape, expected = paths[i]
        array = verify_array(os.path.join(folder, "leaves", f"{i}.npy"), expected, mmap=mmap)
        if list(array.shape) != shape or str(array.dtype) != ("uint16" if dtype == "bfloat16" else dtype):
            raise DamagedEntry(f"leaf {i} is {array.dtype} {list(array.shape)}, recorded {dtype} {shape}")
        return array

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(read, range(len(paths))))
    tree: Any = None
    for (path, dtype, _, _), array in zip(paths, arrays):
        if dtype == "bfloat16":
            import ml_dtypes

            array = array.view(ml_dtypes.bfloat16)
        try:
            tree = _insert(tree, path, array)
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
            raise DamagedEntry(f"tree.json has a malformed path {path!r} ({type(e).__name__})") from None
    return tree


def _insert(node: Any, path: list[list[Any]], value: Any) -> Any:
    """Sets ``value`` at ``path`` (``[["k", key] | ["i", index], ...]``) in a nested dict/list, creating it."""
    if not path:
        return value
    (kind, name), rest = path[0], path[1:]
    if kind == "k":
        node = {} if node is None else node
        node[name] = _insert(node.get(name), rest, value)
        return node
    node = [] if node is None else node
    while len(node) <= name:
        node.append(None)
    node[name] = _insert(node[name], rest, value)
    return node
