"""A jaxind checkpoint's config is checked against its stored weights before anything is restored: an edited
jaxind_config.json is refused with the array's name and both shapes, never silently reshaped or truncated."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from converters import checkpoint
from jaxind.errors import CheckpointError
from jaxind.models import model
from jaxind.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(
    family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    params = jax.tree.map(np.asarray, model.init_params(CFG, jax.random.key(0)))
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    checkpoint.save_checkpoint(path, CFG, checkpoint.groups_of(params), {"source": "test"})
    return path, params


def _copy(saved, tmp_path, **config_changes) -> str:
    path = str(tmp_path / "edited")
    shutil.copytree(saved[0], path)
    config_path = os.path.join(path, checkpoint.CONFIG_FILE)
    with open(config_path) as f:
        data = json.load(f)
    data.update(config_changes)
    with open(config_path, "w") as f:
        json.dump(data, f)
    return path


def test_an_untouched_checkpoint_loads_exactly(saved):
    cfg, params, meta = checkpoint.load_checkpoint(saved[0])
    assert cfg == CFG and sorted(meta["groups"]) == ["embed", "final_norm", "layers.0", "layers.1", "lm_head"]
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 2
    assert params["layers"]["gate"].shape == (2, 64, 128)  # one orbax group per layer on disk, stacked at load
    assert jax.tree.structure(params) == jax.tree.structure(saved[1])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved[1])):
        assert np.array_equal(a, b)


def test_a_format_1_checkpoint_still_loads_and_a_newer_format_is_refused(saved, tmp_path):
    """Format 1 (jaxind 0.1: the same per-layer groups, no format_version) loads as it is; a format this code
    does not know is refused with the fix."""
    path = _copy(saved, tmp_path)
    meta_path = os.path.join(path, checkpoint.META_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["format_version"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    _, params, _ = checkpoint.load_checkpoint(path)
    assert np.array_equal(params["layers"]["up"][1], saved[1]["layers"]["up"][1])
    for bad in (3, "2", 0):
        with open(meta_path, "w") as f:
            json.dump({**meta, "format_version": bad}, f)
        with pytest.raises(CheckpointError, match="convert the model again"):
            checkpoint.load_checkpoint(path)


def test_a_widened_mlp_is_refused_with_the_array_and_both_shapes(saved, tmp_path):
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(_copy(saved, tmp_path, d_ff=256))
    message = str(info.value)
    assert "layers.0.gate" in message and "(64, 128)" in message and "(64, 256)" in message


def test_a_lower_layer_count_is_refused_not_a_dropped_layer(saved, tmp_path):
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(_copy(saved, tmp_path, n_layers=1))
    assert "layers.1" in str(info.value) and "n_layers=1" in str(info.value)


def test_a_higher_layer_count_is_refused(saved, tmp_path):
    with pytest.raises(CheckpointError, match="layers.2"):
        checkpoint.load_checkpoint(_copy(saved, tmp_path, n_layers=3))


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"n_heads": 2, "n_kv_heads": 1}, "layers.0.q"),  # fewer heads: q is narrower than stored
        ({"vocab_size": 300}, "embed"),
        ({"tie_embeddings": True}, "lm_head"),  # the stored head would be dropped
        ({"qkv_bias": True}, "q_bias"),  # the config needs arrays that are not stored
    ],
)
def test_other_edits_are_refused_by_array_name(saved, tmp_path, changes, named):
    with pytest.raises(CheckpointError, match=named):
        checkpoint.load_checkpoint(_copy(saved, tmp_path, **changes))


def test_a_group_missing_from_params_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    shutil.rmtree(os.path.join(path, "params", "layers.1"))
    with pytest.raises(CheckpointError, match="missing from params/: layers.1"):
        checkpoint.load_checkpoint(path)


@pytest.mark.parametrize("text", ["[1, 2, 3]", '{"family": "llama"}', '{"d_ff": 128, "colour": "red"}'])
def test_a_malformed_config_is_a_clean_error(saved, tmp_path, text):
    path = _copy(saved, tmp_path)
    with open(os.path.join(path, checkpoint.CONFIG_FILE), "w") as f:
        f.write(text)
    with pytest.raises(CheckpointError, match=checkpoint.CONFIG_FILE):
        checkpoint.load_checkpoint(path)


def test_the_cli_reports_an_edited_checkpoint_on_one_line(saved, tmp_path):
    edited = _copy(saved, tmp_path, d_ff=256)
    r = subprocess.run(
        [sys.executable, "-m", "jaxind.main", f"--model_a={saved[0]}", f"--model_b={edited}", "--tests=csu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("error: ") and "layers.0.gate" in lines[0] and "(64, 128)" in lines[0]
