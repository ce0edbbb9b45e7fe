"""jaxind checkpoints on disk: orbax param groups plus the config and provenance as JSON.

Layout of a checkpoint directory::

    DIR/jaxind_config.json        ModelConfig
    DIR/jaxind_meta.json          source, format, jaxind version
    DIR/params/embed/             one orbax (PyTree) checkpoint per group: each top-level
    DIR/params/layers.0/ ...      leaf, and each decoder layer
    DIR/tokenizer/                optional: the source's tokenizer (save_pretrained)

Groups are written one at a time, so converting streams: only one layer is in memory.
The directory appears atomically: written under a hidden temporary name, then renamed into
place without replacing anything unless asked to (see :mod:`converters.publish`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Iterable

import jax
import numpy as np

from converters import publish
from jaxind import testhooks
from jaxind.config import ModelConfig
from jaxind.errors import CheckpointError

CONFIG_FILE = "jaxind_config.json"
META_FILE = "jaxind_meta.json"


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def groups_of(params: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """An in-memory param tree as ``(group, leaves)`` pairs (see :func:`converters.build.iter_groups`)."""
    for key, value in params.items():
        if key == "layers":
            for i, layer in enumerate(value):
                yield f"layers.{i}", layer
        else:
            yield key, {key: value}


class CheckpointInterrupted(KeyboardInterrupt):
    """Ctrl-C while writing a checkpoint; the message says what was cleaned up."""


def check_replaceable(out_dir: str) -> None:
    """Raises CheckpointError unless ``out_dir`` may be replaced by ``--overwrite``: only a jaxind
    checkpoint or an empty directory is, never a file or a folder of other things."""
    if os.path.isdir(out_dir) and (is_checkpoint(out_dir) or not os.listdir(out_dir)):
        return
    kind = "a directory that is not a jaxind checkpoint" if os.path.isdir(out_dir) else "not a directory"
    raise CheckpointError(f"{out_dir} exists and is {kind}: --overwrite replaces only jaxind checkpoints; "
                          "choose another --out")


def save_checkpoint(
    out_dir: str,
    cfg: ModelConfig,
    groups: Iterable[tuple[str, dict[str, Any]]],
    meta: dict[str, Any],
    overwrite: bool = False,
    write_tokenizer: Callable[[str], None] | None = None,
) -> None:
    """Writes the groups (numpy or jax leaves) one at a time into a hidden directory beside
    ``out_dir``, then publishes it atomically (:mod:`converters.publish`): ``out_dir`` is at every
    instant absent, the old checkpoint, or the complete new one.

    ``write_tokenizer(dir)``, if given, saves a tokenizer into ``dir`` after the weights
    (so its memory peak does not add to the conversion's).

    Raises:
      CheckpointError: ``out_dir`` exists (or appeared while writing) and ``overwrite`` is
        False, or it is not a checkpoint that ``overwrite`` may replace.
      CheckpointInterrupted: Ctrl-C; the partial directory was removed.
    """
    out_dir = os.path.abspath(out_dir)
    publish.clean_stale(out_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise CheckpointError(f"{out_dir} already exists: choose another --out or pass --overwrite")
        check_replaceable(out_dir)
    tmp = publish.make_temp_dir(out_dir)
    published = False
    try:
        checkpointer = _checkpointer()
        names = []
        for group, leaves in groups:
            checkpointer.save(os.path.join(tmp, "params", group), {k: np.asarray(v) for k, v in leaves.items()})
            names.append(group)
            if len(names) == 1:
                testhooks.stop_at("first_group_written")
        if write_tokenizer is not None:
            write_tokenizer(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({**meta, "groups": names}, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:  # last: its presence marks a checkpoint
            f.write(cfg.to_json())
        testhooks.stop_at("written")
        if overwrite and os.path.lexists(out_dir):
            check_replaceable(out_dir)
        try:
            publish.publish(tmp, out_dir, overwrite)
        except publish.DestinationExists:
            raise CheckpointError(f"{out_dir} appeared while converting (another convert to the same --out?): "
                                  "it was left as it is and this conversion discarded; pass --overwrite to "
                                  "replace it, or choose another --out") from None
        published = True
    except KeyboardInterrupt:
        if published:
            raise CheckpointInterrupted(f"{out_dir} was written; removing the old copy was cut short") from None
        raise CheckpointInterrupted("partial checkpoint removed") from None
    finally:
        if os.path.lexists(tmp):  # unpublished, or the old copy after a swap
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: str) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint written by :func:`save_checkpoint`: ``(config, params, meta)``,
    params as float32 numpy leaves.

    Raises:
      CheckpointError: unreadable config, or missing/corrupt param groups.
    """
    from converters.build import assemble, group_of
    from jaxind import model

    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            cfg = ModelConfig.from_json(f.read())
        meta_path = os.path.join(path, META_FILE)
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read jaxind checkpoint {path}: {e}") from None
    shapes = model.param_shapes_flat(cfg)
    targets: dict[str, dict[str, Any]] = {}
    for leaf_path, shape in shapes.items():
        targets.setdefault(group_of(leaf_path), {})[leaf_path.split(".")[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
    checkpointer = _checkpointer()

    def restore(group: str, target: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        import orbax.checkpoint as ocp

        location = os.path.abspath(os.path.join(path, "params", group))
        try:
            restored = checkpointer.restore(location, args=ocp.args.PyTreeRestore(
                item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)))
        except Exception as e:
            raise CheckpointError(f"cannot restore {location}: {type(e).__name__}: {str(e)[:200]} (incomplete or corrupt checkpoint? convert again)") from None
        return group, restored

    return cfg, assemble((restore(g, t) for g, t in targets.items()), cfg), meta
