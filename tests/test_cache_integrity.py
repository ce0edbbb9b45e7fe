"""The jaxind cache cannot change an answer (docs/DESIGN.md §5.10): its sources are keyed by content
(an in-place edit with the mtime restored is seen), and a damaged entry (noise, flipped bits, a
truncated, deleted or replaced file, bad JSON, an entry from before checksums) is discarded with one
warning and rebuilt to exactly what a fresh conversion gives.

Tiny Llama models: A, A_ft = A + noise (dependent on A) and C (independent), saved as safetensors
of the same size, so one can be rewritten in place with another's bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import run_module
from hf_models import build_torch_model, save

from jaxind.io import disk_cache
from jaxind.many import modelstore


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    import torch

    root = tmp_path_factory.mktemp("cache_models")
    base = build_torch_model("llama_tied", seed=0, num_hidden_layers=2)
    a = save(base, str(root / "a"))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a_ft = save(base, str(root / "a_ft"))
    c = save(build_torch_model("llama_tied", seed=5, num_hidden_layers=2), str(root / "c"))
    sizes = {os.path.getsize(os.path.join(p, "model.safetensors")) for p in (a, a_ft, c)}
    assert len(sizes) == 1  # so an in-place rewrite keeps the size
    return {"a": a, "a_ft": a_ft, "c": c}


def _rewrite_in_place(target: Path, content: bytes) -> None:
    """Overwrites ``target`` with ``content`` (same size, same inode), then restores its mtime (``touch -r``)."""
    before = os.stat(target)
    assert len(content) == before.st_size
    with open(target, "r+b") as f:
        f.write(content)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def test_the_hash_memo_sees_an_in_place_edit_with_the_mtime_restored(tmp_path, monkeypatch):
    """The memo is used while the files' stat is unchanged, and an edit in place with the mtime set back
    (same size, inode and mtime) moves the ctime, so the source is hashed again."""
    source, cache = tmp_path / "m", str(tmp_path / "cache")
    source.mkdir()
    weights = source / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setattr(disk_cache, "MEMO_MIN_AGE_S", 0.05, raising=False)
    time.sleep(0.1)
    first = disk_cache.content_hash(str(source), cache)
    (memo,) = os.listdir(os.path.join(cache, "hashes"))
    Path(cache, "hashes", memo).write_text("f" * 64)  # proves the memo is what answers while nothing changed
    assert disk_cache.content_hash(str(source), cache) == "f" * 64
    _rewrite_in_place(weights, bytes(reversed(range(256))) * 64)
    expected = hashlib.sha256(f"model.safetensors\0{64 * 256}\0".encode() + weights.read_bytes()).hexdigest()
    assert disk_cache.content_hash(str(source), cache) == expected != first
    monkeypatch.undo()  # files changed within MEMO_MIN_AGE_S of hashing are not memoised (racily recent)
    shutil.rmtree(os.path.join(cache, "hashes"))
    weights.write_bytes(bytes(range(256)) * 64)
    assert disk_cache.content_hash(str(source), cache) == first and not os.path.isdir(os.path.join(cache, "hashes"))


def _forget_verified() -> None:
    """As in a new process: nothing verified yet."""
    getattr(disk_cache, "_verified", {}).clear()


def _main(*args: str) -> tuple[dict, str]:
    r = run_module("jaxind.main", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
    return json.loads(Path(out).read_text()), r.stderr


def _log10(doc: dict) -> dict[str, float]:
    return {name: doc["tests"][name]["log10_pvalue"] for name in ("csu", "match")}


def _up_leaf(folder: str) -> str:
    """The path of an up projection's leaf in a stored model."""
    records = json.loads(Path(folder, "weights", "tree.json").read_text())
    (i,) = [i for i, r in enumerate(records) if any(part[1] == "up" for part in r["path"])]
    return os.path.join(folder, "weights", "leaves", f"{i}.npy")


def test_cli_answers_as_without_the_cache_after_an_in_place_edit_and_a_damaged_leaf(tmp_path, models):
    """--model_b=EDIT is cached while it holds C's bytes; then EDIT's weights are rewritten in place with
    A_ft's bytes and its mtime restored: the next cached run must give the p-values of --nomodel_cache
    (dependent), not C's. Noise in a cached up-projection leaf is then caught: one warning naming the entry,
    and again the p-values of --nomodel_cache."""
    edit, cache = tmp_path / "edit", tmp_path / "cache"
    shutil.copytree(models["c"], edit)
    common = [f"--model_a={models['a']}", f"--model_b={edit}", "--tests=csu,match", "--num_sequences=4"]
    common += ["--seq_len=16", f"--cache_dir={cache}"]
    independent, _ = _main(*common, f"--output={tmp_path / 'r0.json'}")
    assert independent["tests"]["csu"]["pvalue"] > 1e-3  # C is independent of A
    _rewrite_in_place(edit / "model.safetensors", Path(models["a_ft"], "model.safetensors").read_bytes())
    cached, _ = _main(*common, f"--output={tmp_path / 'r1.json'}")
    fresh, _ = _main(*common, "--nomodel_cache", f"--output={tmp_path / 'r2.json'}")
    assert _log10(cached) == _log10(fresh) and fresh["tests"]["csu"]["pvalue"] < 1e-6
    key = modelstore.model_key(str(edit), cache_root=str(cache))
    leaf = _up_leaf(str(cache / "models" / key))
    array = np.load(leaf, mmap_mode="r+")
    array[...] = np.random.default_rng(0).standard_normal(array.shape).astype(array.dtype)
    array.flush()
    del array
    damaged, stderr = _main(*common, f"--output={tmp_path / 'r3.json'}")
    warnings = [line for line in stderr.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and key in warnings[0] and "checksum" in warnings[0], stderr[-3000:]
    assert _log10(damaged) == _log10(fresh)


# --- each kind of damage, in process ----------------------------------------------------------------------


def _noise(folder: str) -> None:
    array = np.load(_up_leaf(folder), mmap_mode="r+")
    array[...] = np.random.default_rng(1).standard_normal(array.shape).astype(array.dtype)
    array.flush()


def _flip_bytes(folder: str) -> None:
    path = _up_leaf(folder)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 200)
        chunk = f.read(64)
        f.seek(os.path.getsize(path) - 200)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _truncate(folder: str) -> None:
    path = _up_leaf(folder)
    os.truncate(path, os.path.getsize(path) // 2)


def _delete(folder: str) -> None:
    os.unlink(_up_leaf(folder))


def _directory(folder: str) -> None:
    path = _up_leaf(folder)
    os.unlink(path)
    os.mkdir(path)


def _edit(name: str, change: Callable[[str], str]) -> Callable[[str], None]:
    def damage(folder: str) -> None:
        path = Path(folder, name)
        path.write_text(change(path.read_text()))

    return damage


def _before_checksums(folder: str) -> None:
    """An entry as the release before checksums wrote it: no key in meta.json, no checksum in tree.json."""
    meta = json.loads(Path(folder, "meta.json").read_text())
    for k in ("key", "content_sha256", "dtype", "leaves"):
        meta.pop(k, None)
    Path(folder, "meta.json").write_text(json.dumps(meta))
    tree = Path(folder, "weights", "tree.json")
    tree.write_text(json.dumps([{k: v for k, v in r.items() if k != "sum"} for r in json.loads(tree.read_text())]))


def _entry_is_a_file(folder: str) -> None:
    shutil.rmtree(folder)
    Path(folder).write_text("not an entry")


DAMAGE = {
    "noise": _noise,
    "bit_flips": _flip_bytes,
    "truncated_leaf": _truncate,
    "deleted_leaf": _delete,
    "directory_for_leaf": _directory,
    "truncated_meta_json": _edit("meta.json", lambda t: t[: len(t) // 2]),
    "garbage_tree_json": _edit("weights/tree.json", lambda t: "}garbage{"),
    "tree_json_missing_leaves": _edit("weights/tree.json", lambda t: json.dumps(json.loads(t)[:3])),
    "tree_json_not_records": _edit("weights/tree.json", lambda t: json.dumps([1, 2, 3])),
    "garbage_config_json": _edit("config.json", lambda t: "[1, 2"),
    "before_checksums": _before_checksums,
    "entry_is_a_file": _entry_is_a_file,
}


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """A cache holding A, and A's params as a fresh conversion gives them (by tree path)."""
    from converters.sources import load_model

    cache = str(tmp_path_factory.mktemp("cache_a") / "cache")
    modelstore.ensure("a", models["a"], cache_root=cache)
    return cache, _by_path(load_model(models["a"]).params)


def _by_path(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.array(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_model_entry_is_discarded_and_rebuilt(models, converted, tmp_path, kind, caplog):
    """Each kind of damage: the next ``ensure`` (a new process: nothing verified yet) logs one warning naming
    the entry, converts again and returns exactly the params of a fresh conversion; the one after uses it."""
    cache = str(tmp_path / "cache")
    shutil.copytree(converted[0], cache)
    key = modelstore.model_key(models["a"], cache_root=cache)
    folder = os.path.join(cache, "models", key)
    DAMAGE[kind](folder)
    _forget_verified()
    with caplog.at_level(logging.WARNING):
        stored, rebuilt = modelstore.ensure("a", models["a"], cache_root=cache)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert rebuilt and len(warnings) == 1 and folder in warnings[0], warnings
    params = _by_path(stored.load().params)
    assert params.keys() == converted[1].keys()
    for path, leaf in converted[1].items():
        np.testing.assert_array_equal(params[path], leaf, err_msg=path)
    caplog.clear()
    _forget_verified()
    with caplog.at_level(logging.WARNING):
        _, again = modelstore.ensure("a", models["a"], cache_root=cache)
    assert not again and not [r for r in caplog.records if "is damaged" in r.getMessage()]
    assert [n for n in os.listdir(os.path.join(cache, "models")) if n.startswith(".tmp-")] == []


def test_checksums_are_verified_once_per_file_version(tmp_path, monkeypatch):
    """A second read of an unchanged leaf costs no checksum; a leaf rewritten afterwards is checked again."""
    folder = str(tmp_path / "t")
    disk_cache.save_tree(folder, {"w": np.arange(1000, dtype=np.float32)})
    calls = []
    real = disk_cache.checksum
    monkeypatch.setattr(disk_cache, "checksum", lambda a: calls.append(1) or real(a))
    _forget_verified()
    disk_cache.load_tree(folder)
    disk_cache.load_tree(folder)
    assert len(calls) == 1
    time.sleep(0.02)  # a new ctime tick
    np.save(os.path.join(folder, "leaves", "0.npy"), np.arange(1000, dtype=np.float32)[::-1].copy())
    with pytest.raises(disk_cache.DamagedEntry, match="checksum"):
        disk_cache.load_tree(folder)


def test_two_processes_finding_one_damaged_entry_rebuild_it_once(models, converted, tmp_path):
    """Two processes (spawned, so each has its own verification memo) open the same damaged entry at once: the
    entry's lock lets one discard and rebuild it and the other read the rebuilt one; both get the right params."""
    import multiprocessing

    cache = str(tmp_path / "cache")
    shutil.copytree(converted[0], cache)
    folder = os.path.join(cache, "models", modelstore.model_key(models["a"], cache_root=cache))
    _noise(folder)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_ensure_in_child, [(models["a"], cache)] * 2)
    assert sorted(rebuilt for rebuilt, _ in results) == [False, True]
    for _, params in results:
        for path, leaf in converted[1].items():
            np.testing.assert_array_equal(params[path], leaf, err_msg=path)
    assert [n for n in os.listdir(os.path.join(cache, "models")) if n.startswith(".tmp-")] == []


def _ensure_in_child(source: str, cache: str) -> tuple[bool, dict[str, np.ndarray]]:
    stored, rebuilt = modelstore.ensure("a", source, cache_root=cache)
    return rebuilt, _by_path(stored.load().params)
