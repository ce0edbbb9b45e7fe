"""Logits and MLP-activation parity with transformers (PyTorch, float32) on tiny random models
of every supported family and checkpoint format."""

import numpy as np
import pytest
import torch
from hf_models import FAMILIES, build_torch_model, mlp_modules, save, split_gate_up

import jaxind
from converters.sources import load_model
from jaxind.models.config import MODEL_TYPES

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


# Each family feature, dropped from the config jaxind read, moves the logits far beyond the tolerance: the parity
# tests above exercise it (and a converter or forward that ignored it would fail them).
FEATURES = [
    ("gemma2", {"attn_softcap": None}),
    ("gemma2", {"final_softcap": None}),
    ("gemma2", {"query_pre_attn_scalar": None}),
    ("gemma2", {"layer_types": None}),  # the window on every layer
    ("gemma3", {"rope_local_theta": None}),
    ("gemma3", {"rope_scaling": None}),
    ("gemma3", {"qk_norm": "none"}),
    ("gemma3", {"norm_position": "pre"}),
    ("qwen3", {"qk_norm": "none"}),
    ("qwen3", {"sliding_window": None, "layer_types": None}),
    ("phi3", {"sliding_window": None}),
    ("olmo", {"clip_qkv": None}),
    ("olmo2", {"qk_norm": "none"}),
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Each newer family's tiny model, saved as safetensors and loaded by jaxind, with its transformers logits."""
    tokens = np.random.default_rng(4).integers(0, 97, (2, 12))
    out = {}
    for family in sorted({f for f, _ in FEATURES}):
        ref_model = build_torch_model(family, seed=3)
        ours = load_model(save(ref_model, str(tmp_path_factory.mktemp(family))))
        out[family] = (ours, torch_reference(ref_model, tokens)[0], tokens)
    return out


@pytest.mark.parametrize("family, dropped", FEATURES, ids=[f"{f}-{'-'.join(d)}" for f, d in FEATURES])
def test_parity_would_catch_a_dropped_feature(loaded, family, dropped):
    ours, ref_logits, tokens = loaded[family]
    assert rel_err(ours.logits(tokens), ref_logits) <= TOL
    wrong = jaxind.from_params(ours.config.replace(**dropped), ours.params)
    assert rel_err(wrong.logits(tokens), ref_logits) > 100 * TOL


def test_multimodal_gemma3_checkpoint_loads_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (vision tower, projector, text model under language_model.*):
    jaxind reads the text model and matches transformers' multimodal model on text-only input."""
    import transformers
    from hf_models import TINY

    text = build_torch_model("gemma3", seed=5).config.to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16)
    config = transformers.Gemma3Config(
        text_config=text, vision_config={**vision, "patch_size": 8}, mm_tokens_per_image=4
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(5)
    ref_model = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            p.copy_((0.3 if "norm" in name else 0.15) * torch.randn_like(p))
    ref_model.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    assert ours.config.family == "gemma3" and ours.config.n_layers == 3
    ignored = ours.summary()["ignored_config_keys"]
    assert "vision_config" in ignored
    # the text model's final soft-cap (3.0 here) is not applied by the multimodal model; nor by jaxind
    assert ours.config.final_softcap is None and "does not apply" in ignored["text_config.final_logit_softcapping"]
    tokens = np.random.default_rng(6).integers(0, TINY["vocab_size"], (2, 12))
    ref_logits, ref_acts = torch_reference(ref_model, tokens)
    assert rel_err(ours.logits(tokens), ref_logits) <= TOL
    acts = ours.mlp_activations(tokens, layers=[1])
    assert rel_err(acts[1]["up"], ref_acts[1]["up"]) <= TOL
