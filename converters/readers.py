"""Checkpoint readers: ``names()`` lists the tensors, ``load(name)`` reads one as float32 numpy.

Reading is by name, in whatever order the converter wants (layer by layer), so a converter
holds one layer plus one tensor at a time, never two copies of the model.

Readers:
  * :class:`HFDirReader` -- a Hugging Face model directory: ``config.json`` plus
    ``*.safetensors`` (single or sharded with an index) or ``pytorch_model*.bin``.
  * :class:`GGUFFileReader` -- a ``.gguf`` file, dequantised with the ``gguf`` package.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
from typing import Any, cast

import numpy as np
from absl import logging

from converters import mappings
from jaxind.errors import CheckpointError, UnsupportedModelError
from jaxind.io.hf_config import parse_hf_config
from jaxind.models.config import Family, ModelConfig


def _log_ignored(where: str, ignored: dict[str, str]) -> None:
    """One info log line naming the config keys that were ignored (they cannot change the function, so this is
    no warning; the results JSON lists them with the reason under ``ignored_config_keys``)."""
    if ignored:
        logging.info(
            "%s: ignoring config keys that cannot change the model's function: %s",
            where,
            ", ".join(f"{key} ({why})" for key, why in ignored.items()),
        )


class HFDirReader:
    """A local Hugging Face model directory."""

    format = "hf"

    def __init__(self, path: str):
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(
                f"{path} has no config.json: pass a Hugging Face model directory, a .gguf file or a jaxind (orbax) "
                "checkpoint"
            )
        try:
            with open(config_path) as f:
                self.hf_config: dict[str, Any] = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot parse {config_path}: {e}") from None
        if not isinstance(self.hf_config, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
                type(self.hf_config), "null"
            )
            raise CheckpointError(
                f"{config_path} holds {kind}, not an object of model settings: restore the "
                "checkpoint's original config.json"
            )
        self.config: ModelConfig
        self.config, self.ignored_config_keys = parse_hf_config(self.hf_config)
        _log_ignored(config_path, self.ignored_config_keys)
        self.table = mappings.HF_TABLES[self.config.family]
        self.ignored = mappings.HF_IGNORED + mappings.HF_OTHER_MODALITIES.get(self.config.family, ())
        self.files, self.kind = self._weight_files()
        # tensor name -> the file holding it (read from the headers only)
        self._where = {
            name: file
            for file in self.files
            for name in (_safetensors_names(file) if self.kind == "safetensors" else _torch_bin(file))
        }

    def _weight_files(self) -> tuple[list[str], str]:
        for index_name, kind in (
            ("model.safetensors.index.json", "safetensors"),
            ("pytorch_model.bin.index.json", "bin"),
        ):
            index_path = os.path.join(self.path, index_name)
            if os.path.isfile(index_path):
                try:
                    with open(index_path) as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                except (OSError, json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"cannot read shard index {index_path}: {e}") from None
                files = [os.path.join(self.path, s) for s in shards]
                missing = [s for s, f in zip(shards, files) if not os.path.isfile(f)]
                if missing:
                    raise CheckpointError(
                        f"{index_path} lists shards that are missing: {missing}; re-download the checkpoint"
                    )
                return files, kind
        files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        if files:
            return files, "safetensors"
        files = sorted(glob.glob(os.path.join(self.path, "pytorch_model*.bin")))
        if files:
            return files, "bin"
        raise CheckpointError(
            f"no weights in {self.path}: expected *.safetensors or pytorch_model*.bin next to config.json"
        )

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint (headers only; no tensor data is read)."""
        return list(self._where)

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy."""
        file = self._where[name]
        if self.kind == "safetensors":
            return _safetensors_load(file, name)
        return np.array(_torch_bin(file)[name].to(_torch().float32).numpy())  # copy out of the mmap

    def tokenizer_source(self) -> dict[str, str]:
        return {"kind": "hf", "path": self.path}

    def has_tokenizer(self) -> bool:
        """Whether the directory ships tokenizer files at all (their contents are not read)."""
        from jaxind.io.tokenizer import TOKENIZER_FILES

        return any(os.path.isfile(os.path.join(self.path, name)) for name in TOKENIZER_FILES)


def _safetensors_names(file: str) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {file}: {e} (truncated or corrupt file? re-download or re-save it)"
        ) from None


def _safetensors_load(file: str, name: str) -> np.ndarray:
    """Reads one tensor, opening the file for this tensor alone so that no mapping (and no
    resident page) outlives the read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy") as handle:
            if handle.get_slice(name).get_dtype() != "BF16":
                return np.asarray(handle.get_tensor(name), dtype=np.float32)
        with safe_open(file, framework="flax") as handle:  # numpy has no bfloat16: go through JAX
            return np.asarray(handle.get_tensor(name), dtype=np.float32)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read tensor {name} from {file}: {e} (truncated or corrupt file? re-download it)"
        ) from None


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "reading pytorch_model*.bin needs PyTorch (pip install torch), or convert the checkpoint to safetensors"
        ) from None
    return torch


@functools.lru_cache(maxsize=1)
def _torch_bin(file: str) -> dict[str, Any]:
    """The state dict of one .bin file, memory-mapped (tensors are read on access)."""
    torch = _torch()
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt zip/pickle files
        raise CheckpointError(f"cannot read {file}: {e} (truncated or corrupt file?)") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# The `{arch}.*` GGUF metadata keys GGUFFileReader reads or checks.
_GGUF_READ = (
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon",
    "attention.sliding_window",
    "attention.sliding_window_pattern",
    "attention.clamp_kqv",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "rope.freq_base",
    "rope.freq_base_swa",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "expert_count",
    "expert_used_count",
    "expert_feed_forward_length",
    "expert_shared_feed_forward_length",
    "expert_weights_norm",
)
# GGUF metadata that llama.cpp itself does not apply, and why it is ignored.
_GGUF_UNUSED = {
    "phi3.attention.sliding_window": "llama.cpp and transformers' GGUF loader run Phi-3 files without the window",
}
# llama.cpp's Gemma defaults for what a GGUF file may not carry: every `period`-th layer attends globally, the
# others within the window (`{arch}.attention.sliding_window_pattern` overrides); Gemma 3's local layers use RoPE
# base 1e4 (`{arch}.rope.freq_base_swa` overrides) and no RoPE scaling; queries are scaled by 1/sqrt(head_dim),
# except in the 27B models (recognised, as llama.cpp does, by their depth), which use 1/sqrt(d_model / heads).
_GEMMA_GGUF = {"gemma2": {"period": 2, "window": 4096, "27b_layers": 46}, "gemma3": {"period": 6, "27b_layers": 62}}


def _gguf_family_fields(arch: str, r: Any, n_layers: int, d: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    """The :class:`ModelConfig` fields of the family-specific features of GGUF architecture ``arch``, read from
    its metadata and completed with llama.cpp's defaults for that architecture."""
    if arch in _GEMMA_GGUF:
        spec = _GEMMA_GGUF[arch]
        window = _field(r, f"{arch}.attention.sliding_window", spec.get("window"))
        pattern = _field(r, f"{arch}.attention.sliding_window_pattern", spec["period"])
        if isinstance(pattern, list):  # one flag per layer
            sliding = [bool(p) for p in pattern]
        else:  # a period: the last layer of every period attends globally
            sliding = [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n_layers)]
        types = tuple("sliding_attention" if s else "full_attention" for s in sliding)
        fields: dict[str, Any] = {
            "mlp_act": "gelu_tanh",
            "norm_offset": 1.0,
            "embed_scale": True,
            "norm_position": "sandwich",
            "query_pre_attn_scalar": float(d // n_heads if n_layers == spec["27b_layers"] else head_dim),
            "sliding_window": int(window) if window and any(sliding) else None,
            "layer_types": types if window and any(sliding) else None,
        }
        if arch == "gemma2":
            fields["attn_softcap"] = float(_field(r, "gemma2.attn_logit_softcapping", 50.0)) or None
            fields["final_softcap"] = float(_field(r, "gemma2.final_logit_softcapping", 30.0)) or None
        local_theta = _field(r, f"{arch}.rope.freq_base_swa", 10000.0 if arch == "gemma3" else None)
        if local_theta is not None:
            fields["rope_local_theta"] = float(local_theta)
        if arch == "gemma3":
            fields["qk_norm"] = "head"
        return fields
    if arch == "qwen3":
        return {"qk_norm": "head"}
    if arch == "olmo2":
        return {"norm_position": "post", "qk_norm": "proj"}
    if arch == "olmo":
        clip = _field(r, "olmo.attention.clamp_kqv")
        eps = float(_field(r, "olmo.attention.layer_norm_epsilon", 1e-5))
        return {"norm_kind": "nonparam", "norm_eps": eps, "clip_qkv": float(clip) if clip else None}
    return {}


def _gguf_moe_fields(r: Any, arch: str, family: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a GGUF file with ``{arch}.expert_count`` (llama.cpp's keys): Mixtral
    (``llama``: the experts are ``feed_forward_length`` wide, no dense MLP) or Qwen2-MoE (``qwen2moe``: expert and
    shared-expert widths of their own). Routing weights are renormalised where llama.cpp does: always for Mixtral,
    for Qwen2-MoE only with ``{arch}.expert_weights_norm``."""
    needed = ["expert_count", "expert_used_count"]
    needed += ["feed_forward_length"] if family == "mixtral" else ["expert_feed_forward_length"]
    needed += [] if family == "mixtral" else ["expert_shared_feed_forward_length"]
    missing = [f"{arch}.{key}" for key in needed if _field(r, f"{arch}.{key}") is None]
    if missing:
        raise CheckpointError(
            f"GGUF mixture of experts lacks {', '.join(missing)} (llama.cpp writes them): the file is incomplete"
        )
    fields: dict[str, Any] = {
        "family": family,
        "n_experts": int(_field(r, f"{arch}.expert_count")),
        "experts_per_token": int(_field(r, f"{arch}.expert_used_count")),
    }
    if family == "mixtral":
        return {**fields, "d_expert": int(_field(r, f"{arch}.feed_forward_length")), "d_ff": 0, "norm_topk_prob": True}
    return {
        **fields,
        "d_expert": int(_field(r, f"{arch}.expert_feed_forward_length")),
        "d_ff": int(_field(r, f"{arch}.expert_shared_feed_forward_length")),
        "shared_expert": True,
        "norm_topk_prob": bool(_field(r, f"{arch}.expert_weights_norm", False)),
    }


@functools.cache
def gguf_readable_types() -> tuple[str, ...]:
    """The GGUF tensor types (``GGMLQuantizationType`` names) the installed ``gguf`` package dequantises, so
    :class:`GGUFFileReader` reads: probed with one zero block of each type (README lists them; a test checks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    names = []
    for t in GGMLQuantizationType:
        block, size = GGML_QUANT_SIZES[t]
        try:
            quants.dequantize(np.zeros((1, size), np.uint8), t)
        except Exception:  # NotImplementedError: not dequantisable (Q8_1, Q8_K, integer types)
            continue
        names.append(t.name)
    return tuple(names)


def _refuse_unreadable_tensors(path: str, tensors: Any, ignored: tuple[str, ...]) -> None:
    """One error naming the first tensor (not ``ignored``) stored in a type the ``gguf`` package cannot dequantise."""
    readable = gguf_readable_types()
    for t in tensors:
        if t.tensor_type.name not in readable and not any(re.fullmatch(p, t.name) for p in ignored):
            raise UnsupportedModelError(
                f"GGUF tensor {t.name} in {path} is stored as {t.tensor_type.name}, which jaxind cannot dequantise "
                f"(readable: {', '.join(readable)}): re-quantise the file to one of these, e.g. with llama.cpp's "
                "llama-quantize to Q8_0"
            )


class GGUFFileReader:
    """A ``.gguf`` file (llama.cpp), dequantised to float32 tensor by tensor; any mix of the
    :func:`gguf_readable_types` loads."""

    format = "gguf"

    def __init__(self, path: str):
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # the reader raises ValueError/IndexError/... on bad bytes
            raise CheckpointError(f"cannot read GGUF file {path}: {e} (truncated or corrupt? re-download it)") from None
        arch = _field(self.reader, "general.architecture")
        if arch not in mappings.GGUF_TABLES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(mappings.GGUF_TABLES)})"
            )
        family, self.table = mappings.GGUF_TABLES[arch]
        self.ignored = mappings.GGUF_IGNORED
        self._tensors = {t.name: t for t in self.reader.tensors}
        _refuse_unreadable_tensors(path, self.reader.tensors, self.ignored)
        try:
            self.config = self._config(arch, family)
            if _field(self.reader, f"{arch}.expert_count"):  # a mixture of experts
                family, self.table = mappings.GGUF_MOE_TABLES[arch]
                self.config = self.config.replace(**_gguf_moe_fields(self.reader, arch, family))
        except (TypeError, ValueError, ZeroDivisionError, StopIteration):  # a missing (None) or malformed value
            raise CheckpointError(
                f"GGUF file {path} lacks required {arch}.* metadata (block_count, embedding_length, "
                "head_count, feed_forward_length) or has malformed values: re-download it"
            ) from None
        self.hf_config = None
        _log_ignored(path, self.ignored_config_keys)

    def _config(self, arch: str, family: str) -> ModelConfig:
        r = self.reader
        names = {t.name for t in r.tensors}
        n_heads = int(_field(r, f"{arch}.attention.head_count"))
        d = int(_field(r, f"{arch}.embedding_length"))
        tokens = _field(r, "tokenizer.ggml.tokens")
        vocab = _field(r, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
        if vocab is None:
            vocab = next(int(t.shape[-1]) for t in r.tensors if t.name == "token_embd.weight")
        head_dim = int(_field(r, f"{arch}.attention.key_length", d // n_heads))
        self._refuse_unsupported_metadata(arch, head_dim)
        scaling: tuple | None = None
        if "rope_freqs.weight" in names:  # Llama 3.1-style scaling stored as per-frequency divisors
            tensor = next(t for t in r.tensors if t.name == "rope_freqs.weight")
            scaling = (
                ("factors", tuple(float(v) for v in np.asarray(tensor.data, np.float32))),
                ("rope_type", "factors"),
            )
        elif _field(r, f"{arch}.rope.scaling.type") not in (None, "none"):
            kind = _field(r, f"{arch}.rope.scaling.type")
            if kind != "linear":
                raise UnsupportedModelError(f"GGUF RoPE scaling {kind!r} is not supported")
            scaling = (("factor", float(_field(r, f"{arch}.rope.scaling.factor"))), ("rope_type", "linear"))
        n_layers = int(_field(r, f"{arch}.block_count"))
        fields = _gguf_family_fields(arch, r, n_layers, d, n_heads, head_dim)
        eps = _field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
        return ModelConfig(
            family=cast(Family, family),
            vocab_size=int(vocab),
            d_model=d,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(_field(r, f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            d_ff=int(_field(r, f"{arch}.feed_forward_length")),
            norm_eps=float(fields.pop("norm_eps", eps)),
            rope_theta=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            **fields,
        )

    def _refuse_unsupported_metadata(self, arch: str, head_dim: int) -> None:
        """Refuses the metadata that changes the function and that jaxind does not implement; records the
        other ``{arch}.*`` keys it does not read in ``ignored_config_keys`` (they never block)."""
        r = self.reader
        experts = _field(r, f"{arch}.expert_count")
        if experts and arch not in mappings.GGUF_MOE_TABLES:
            raise UnsupportedModelError(
                f"GGUF {arch}.expert_count={experts}: mixture-of-experts {arch} models are not supported "
                f"(supported: {', '.join(mappings.GGUF_MOE_TABLES)})"
            )
        rope_dims = _field(r, f"{arch}.rope.dimension_count")
        if rope_dims not in (None, head_dim):
            raise UnsupportedModelError(
                f"GGUF {arch}.rope.dimension_count={rope_dims} with head size {head_dim}: "
                "RoPE on part of each head is not supported"
            )
        if arch == "phi3" and any(n.startswith("rope_factors_") for n in self._tensors):
            raise UnsupportedModelError(
                "GGUF phi3 with rope_factors_long/short tensors (LongRoPE, Phi-3-128k/Phi-3.5/Phi-4-mini) "
                "is not supported"
            )
        if arch == "olmo2" and _field(r, "olmo2.attention.sliding_window"):
            raise UnsupportedModelError("GGUF olmo2 with sliding-window layers (OLMo 3) is not supported")
        value_dim = _field(r, f"{arch}.attention.value_length")
        if value_dim not in (None, head_dim):
            raise UnsupportedModelError(
                f"GGUF {arch}.attention.value_length={value_dim} differs from key_length={head_dim}: not supported"
            )
        read = {f"{arch}.{k}" for k in _GGUF_READ} - set(_GGUF_UNUSED)
        self.ignored_config_keys = {
            k: _GGUF_UNUSED.get(k, "GGUF metadata jaxind does not use")
            for k in r.fields
            if k.startswith(f"{arch}.") and k not in read
        }

    def names(self) -> list[str]:
        return list(self._tensors)

    def load(self, name: str) -> np.ndarray:
        """One tensor, dequantised to float32 in blocks of rows (bounded temporaries)."""
        from gguf import quants

        tensor = self._tensors[name]
        data = tensor.data
        try:
            if data.ndim < 2:
                return np.asarray(quants.dequantize(data, tensor.tensor_type), dtype=np.float32)
            first = np.asarray(quants.dequantize(data[:1], tensor.tensor_type), dtype=np.float32)
            out = np.empty((data.shape[0],) + first.shape[1:], np.float32)
            step = max(1, (1 << 22) // max(1, first.size))
            for i in range(0, data.shape[0], step):
                out[i : i + step] = quants.dequantize(data[i : i + step], tensor.tensor_type)
            return out
        except Exception as e:
            raise CheckpointError(
                f"cannot dequantise {name} ({tensor.tensor_type.name}) from {self.path}: {e}"
            ) from None

    def tokenizer_source(self) -> dict[str, str]:
        return {"kind": "gguf", "path": self.path}

    def has_tokenizer(self) -> bool:
        """Whether the file carries a tokenizer (``tokenizer.ggml.*`` metadata)."""
        return "tokenizer.ggml.tokens" in self.reader.fields
