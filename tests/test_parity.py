"""Logits and MLP-activation parity with transformers (PyTorch, float32) on tiny random models
of every supported family and checkpoint format."""

import numpy as np
import pytest
import torch
from hf_models import FAMILIES, build_torch_model, mlp_modules, save, split_gate_up

import jaxind
from converters.sources import load_model
from jaxind.config import MODEL_TYPES

TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_reference(model, tokens):
    """Logits and per-layer gate/up outputs captured with forward hooks."""
    captured = {}
    hooks = []
    for i, modules in enumerate(mlp_modules(model)):
        for proj, module in modules.items():
            hooks.append(
                module.register_forward_hook(
                    lambda mod, inp, out, i=i, proj=proj: captured.setdefault(i, {}).__setitem__(
                        proj, out.detach().numpy()
                    )
                )
            )
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.numpy()
    for h in hooks:
        h.remove()
    return logits, {layer: split_gate_up(outputs) for layer, outputs in captured.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_logits_and_activations_match_transformers(tmp_path, family, fmt):
    ref_model = build_torch_model(family, seed=1)
    path = save(ref_model, str(tmp_path / family), fmt)
    ours = load_model(path)
    assert ours.config.family == MODEL_TYPES[ref_model.config.model_type]
    tokens = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 12))  # 12 > mistral window 5
    ref_logits, ref_acts = torch_reference(ref_model, tokens)
    assert rel_err(ours.logits(tokens), ref_logits) <= TOL
    acts = ours.mlp_activations(tokens)
    assert sorted(acts) == list(range(ours.config.n_layers))
    for layer, ref in ref_acts.items():
        assert sorted(acts[layer]) == sorted(ref)
        for proj in ref:
            assert acts[layer][proj].shape == (2, 12, ours.config.d_ff)
            assert rel_err(acts[layer][proj], ref[proj]) <= TOL, (layer, proj)


def test_parity_would_catch_a_wrong_rope_scaling(tmp_path):
    """The llama3 RoPE scaling is exercised: dropping it changes the logits beyond tolerance."""
    ref_model = build_torch_model("llama", seed=2)
    ours = load_model(save(ref_model, str(tmp_path / "m")))
    wrong = jaxind.from_params(ours.config.replace(rope_scaling=None), ours.params)
    tokens = np.random.default_rng(1).integers(0, ours.config.vocab_size, (1, 40))
    ref_logits, _ = torch_reference(ref_model, tokens)
    assert rel_err(ours.logits(tokens), ref_logits) <= TOL
    assert rel_err(wrong.logits(tokens), ref_logits) > 100 * TOL


def test_selected_layers_only(tmp_path):
    ours = load_model(save(build_torch_model("qwen2"), str(tmp_path / "m")))
    tokens = np.zeros((1, 4), np.int64)
    acts = ours.mlp_activations(tokens, layers=[-1, 0])
    assert sorted(acts) == [0, ours.config.n_layers - 1]
    with pytest.raises(ValueError, match="out of range"):
        ours.mlp_activations(tokens, layers=[7])
    with pytest.raises(jaxind.JaxindError, match="token ids"):
        ours.logits(np.full((1, 3), ours.config.vocab_size))
