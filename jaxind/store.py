"""The jaxind cache on disk: content hashes of model sources, and entries (directories) that are
written once, published atomically and read many times (docs/DESIGN.md §5.10).

Layout under the cache root (``$JAXIND_CACHE``, default ``~/.cache/jaxind``)::

    hashes/<signature>.txt        content hash of a model source, memoised by its files' stat
    models/<model key>/           a converted model: config.json, meta.json, tree.json, leaves/*.npy
    fingerprints/<key>/           a model's fingerprint on a token set (jaxind.fingerprint)
    jax/                          JAX's persistent compilation cache (jaxind.cli_utils)

**Why content hashes, memoised by stat.** A model is identified by the bytes of its source files
(every regular file of a directory, or the ``.gguf`` file), so two paths to the same model share
their cache entries and an edited model never reuses a stale one. Hashing reads the files once
(about the cost of the conversion that a cache hit then skips); the result is memoised under a
signature of the files' paths, sizes, mtimes and inodes, so later lookups cost one ``stat`` per
file. A hash of the param arrays would need the conversion before the lookup, which is the work
the cache exists to skip.

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
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxind import assets, destinations
from jaxind.errors import JaxindError

HASH_VERSION = 1
_CHUNK = 1 << 24


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


def content_hash(path: str, cache_root: str | None = None) -> str:
    """sha256 (hex) of a model source's files: names, sizes and bytes, in name order.

    Memoised under ``hashes/`` by the files' stat signature, so a second call reads no data.

    Raises:
      JaxindError: the path has no files.
    """
    path = os.path.abspath(path)
    files = _files(path)
    if not files:
        raise JaxindError(f"model source {path} has no files to read")
    signature = [(name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in ((n, os.stat(p)) for n, p in files)]
    memo = os.path.join(root(cache_root), "hashes", key_of(v=HASH_VERSION, path=path, files=signature) + ".txt")
    with contextlib.suppress(OSError):
        with open(memo) as f:
            known = f.read().strip()
        if len(known) == 64:
            return known
    digest = hashlib.sha256()
    for name, full in files:
        digest.update(f"{name}\0{os.path.getsize(full)}\0".encode())
        with open(full, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    value = digest.hexdigest()
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
    leaves' paths, dtypes and shapes); returns the bytes written. bfloat16 leaves are stored as
    their uint16 bits."""
    import jax

    os.makedirs(os.path.join(folder, "leaves"), exist_ok=True)
    records, total = [], 0
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        array = np.asarray(leaf)
        dtype = str(array.dtype)
        if dtype == "bfloat16":
            array = array.view(np.uint16)
        np.save(os.path.join(folder, "leaves", f"{i}.npy"), array)
        records.append({"path": _path_json(path), "dtype": dtype, "shape": list(array.shape)})
        total += array.nbytes
    with open(os.path.join(folder, "tree.json"), "w") as f:
        json.dump(records, f)
    return total


def load_tree(folder: str, mmap: bool = True) -> Any:
    """The tree :func:`save_tree` wrote, leaves as (memory-mapped) numpy arrays."""
    with open(os.path.join(folder, "tree.json")) as f:
        records = json.load(f)
    tree: Any = None
    for i, record in enumerate(records):
        array = np.load(os.path.join(folder, "leaves", f"{i}.npy"), mmap_mode="r" if mmap else None)
        if record["dtype"] == "bfloat16":
            import ml_dtypes

            array = array.view(ml_dtypes.bfloat16)
        if list(array.shape) != record["shape"]:
            raise JaxindError(f"{folder}: leaf {i} has shape {array.shape}, expected {record['shape']}")
        tree = _insert(tree, record["path"], array)
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
