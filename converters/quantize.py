"""Writing GGUF files at a llama.cpp quantisation type, as they are published.

* :func:`write_gguf_quantized` writes a jaxind param tree (Llama family) as a llama.cpp-layout GGUF file;
* :func:`requantize_gguf` re-quantises an existing GGUF file (any architecture the file has), metadata kept.

Both quantise each tensor with :func:`quantize_tensor`, which falls back per tensor as llama.cpp does: 1-D
tensors (norms, biases) stay F32; a tensor whose rows are not a multiple of the type's block (256 values for
K-quants, 32 for the others) takes llama.cpp's fallback type (Q4_K -> Q5_0) and, where that does not fit either,
F16. The ``gguf`` package quantises the 32-value types (Q4_0 .. Q8_0), BF16, TQ1_0/TQ2_0 and MXFP4; it can only
dequantise K-quants, so Q4_K (the most published type) is quantised here (:func:`quantize_q4_k`, a simpler
version of llama.cpp's ``quantize_row_q4_K_ref``; its blocks are read back by ``gguf``'s own dequantiser).
docs/DESIGN.md §5.7.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from absl import logging

from converters import readers
from jaxind.errors import JaxindError
from jaxind.io import destinations
from jaxind.models.config import ModelConfig

QK_K = 256
# llama.cpp's llama_tensor_get_type fallback for a tensor whose rows are not a multiple of QK_K.
_FALLBACK = {"Q4_K": "Q5_0"}


def _qtype(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _block_size(name: str) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[_qtype(name)][0]


@functools.cache
def writable_types() -> tuple[str, ...]:
    """The types :func:`quantize_tensor` writes: F32, F16, what the ``gguf`` package quantises, and Q4_K."""
    from gguf import GGMLQuantizationType, quants

    x = np.zeros((1, QK_K), np.float32)
    names = []
    for t in GGMLQuantizationType:
        try:
            quants.quantize(x, t)
        except Exception:  # NotImplementedError: gguf-py only dequantises (or neither) this type
            continue
        names.append(t.name)
    return tuple(names) + ("Q4_K",)


def _fit_groups(x: np.ndarray, refits: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per group of 32 values (last axis): a step ``s >= 0`` and offset ``m >= 0`` with ``x ~ s * q - m``,
    ``q`` in 0..15: min/max, then ``refits`` least-squares refits for the rounded ``q`` (as llama.cpp's
    ``make_qkx2_quants`` refines its first guess); a refit that would leave the format is not taken."""
    lo = np.minimum(x.min(-1), 0.0)
    scale, mins = (x.max(-1) - lo) / 15.0, -lo
    n = x.shape[-1]
    for _ in range(refits):
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale[..., None] > 0, np.rint((x + mins[..., None]) / scale[..., None]), 0).clip(0, 15)
            sq, sqq, sx, sqx = q.sum(-1), (q * q).sum(-1), x.sum(-1), (q * x).sum(-1)
            det = n * sqq - sq * sq
            s = (n * sqx - sq * sx) / det
            m = (s * sq - sx) / n
        ok = (det > 0) & (s > 0) & (m >= 0) & np.isfinite(s) & np.isfinite(m)
        scale, mins = np.where(ok, s, scale), np.where(ok, m, mins)
    return scale.astype(np.float32), mins.astype(np.float32)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 ``(n, k)`` (``k`` a multiple of 256) -> Q4_K bytes ``(n, k // 256 * 144)``.

    Each 256-value super-block holds f16 ``d`` and ``dmin``, eight 6-bit scales and mins (one per 32 values,
    packed in 12 bytes as ggml does) and 4-bit values: ``x = d * sc_j * q - dmin * m_j``.
    """
    n, k = rows.shape
    x = rows.astype(np.float32).reshape(-1, 8, 32)
    scale, mins = _fit_groups(x)
    d16 = (scale.max(-1) / 63.0).astype(np.float16)
    dmin16 = (mins.max(-1) / 63.0).astype(np.float16)
    d, dmin = d16.astype(np.float32)[:, None], dmin16.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.rint(scale / d), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin > 0, np.rint(mins / dmin), 0).clip(0, 63).astype(np.uint8)
        step, offset = (d * sc)[..., None], (dmin * mn)[..., None]
        q = np.where(step > 0, np.rint((x + offset) / step), 0).clip(0, 15).astype(np.uint8)
    packed = np.concatenate(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4),
        ],
        axis=-1,
    )
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), packed, qs], axis=-1)
    return blocks.reshape(n, k // QK_K * 144)


def target_type(shape: tuple[int, ...], qtype: str) -> str:
    """The type llama.cpp stores a tensor of ``shape`` (numpy order, rows last) in when asked for ``qtype``:
    F32 for 1-D tensors, ``qtype`` where the row length is a multiple of its block, else its fallback, else F16."""
    if len(shape) < 2 or qtype == "F32":
        return "F32"
    for name in (qtype, _FALLBACK.get(qtype)):
        if name is not None and shape[-1] % _block_size(name) == 0:
            return name
    return "F16"


def quantize_tensor(w: np.ndarray, qtype: str) -> tuple[np.ndarray, str]:
    """``w`` (float, numpy order) stored as llama.cpp would at ``qtype``: ``(bytes or float array, type name)``.

    Raises:
      JaxindError: ``qtype`` is not one of :func:`writable_types`.
    """
    from gguf import quants

    if qtype not in writable_types():
        raise JaxindError(
            f"cannot write GGUF type {qtype!r}: writable types are {', '.join(writable_types())} "
            "(the gguf package only dequantises the others; use llama.cpp's llama-quantize for them)"
        )
    kind = target_type(w.shape, qtype)
    w = np.ascontiguousarray(w, np.float32)
    if kind == "F32":
        return w, kind
    if kind == "F16":
        return w.astype(np.float16), kind
    if kind == "Q4_K":
        return quantize_q4_k(w.reshape(-1, w.shape[-1])).reshape(*w.shape[:-1], -1), kind
    return quants.quantize(w, _qtype(kind)), kind


class _Writer:
    """A GGUFWriter that quantises every tensor it is given and counts the types it stored."""

    def __init__(self, path: str, arch: str, qtype: str):
        from gguf import GGUFWriter

        self.gguf = GGUFWriter(path, arch)
        self.qtype = qtype
        self.counts: dict[str, int] = {}

    def tensor(self, name: str, w: np.ndarray) -> None:
        data, kind = quantize_tensor(w, self.qtype)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        raw = None if kind in ("F32", "F16") else _qtype(kind)
        self.gguf.add_tensor(name, data, raw_dtype=raw)

    def finish(self) -> None:
        self.gguf.write_header_to_file()
        self.gguf.write_kv_data_to_file()
        self.gguf.write_tensors_to_file()
        self.gguf.close()
        logging.info("wrote %s at %s: tensors by type %s", self.gguf.path, self.qtype, self.counts)


def _file_type(writer: _Writer) -> None:
    """``general.file_type`` where llama.cpp has a name for exactly this type."""
    from gguf import LlamaFileType

    name = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(writer.qtype, f"MOSTLY_{writer.qtype}")
    if name in LlamaFileType.__members__:
        writer.gguf.add_file_type(LlamaFileType[name])


def _interleave_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's half-split q/k rows ``(heads*hd, ...)`` -> llama.cpp's interleaved order (the inverse of the reader's
    ``mappings._unpermute_rope``)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The ModelConfig fields a llama.cpp `llama` GGUF file expresses; every other field must keep its default.
_LLAMA_FIELDS = frozenset(
    "family vocab_size d_model n_layers n_heads n_kv_heads head_dim d_ff norm_eps rope_theta tie_embeddings "
    "qkv_bias max_positions".split()
)


def _check_writable_model(cfg: ModelConfig) -> None:
    plain = ModelConfig("llama", 1, 1, 1, 1, 1, 1, 1)
    extra = [
        f.name
        for f in dataclasses.fields(cfg)
        if f.name not in _LLAMA_FIELDS and getattr(cfg, f.name) != getattr(plain, f.name)
    ]
    if cfg.family != "llama" or extra:
        raise JaxindError(
            f"write_gguf_quantized writes plain Llama-family models only (got family {cfg.family!r}"
            f"{', with ' + ', '.join(extra) if extra else ''}): re-quantise a GGUF file with requantize_gguf instead"
        )


def _llama_metadata(w: Any, cfg: ModelConfig) -> None:
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_positions or 2048)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)


def write_gguf_quantized(
    cfg: ModelConfig, params: dict[str, Any], path: str, qtype: str = "Q8_0", tokenizer_from: str | None = None
) -> str:
    """Writes a Llama-family jaxind model (``cfg``, its param tree) to ``path`` as llama.cpp's converter and
    ``llama-quantize`` would: q/k rows interleaved for RoPE, every 2-D weight at ``qtype`` (llama.cpp's per-tensor
    fallback, :func:`target_type`), norms F32. ``tokenizer_from``: a GGUF file whose ``tokenizer.*`` metadata is
    copied. Written atomically; returns the file's path.

    Raises:
      JaxindError: the model is not a plain Llama-family model, or ``qtype`` is not writable.
    """
    _check_writable_model(cfg)
    quantize_tensor(np.zeros(1, np.float32), qtype)  # refuses an unwritable type before anything is written
    lay = {k: np.asarray(v, np.float32) for k, v in params["layers"].items()}

    def write(tmp: str) -> None:
        w = _Writer(tmp, "llama", qtype)
        _llama_metadata(w.gguf, cfg)
        _file_type(w)
        if tokenizer_from is not None:
            _copy_fields(tokenizer_from, w.gguf, lambda k: k.startswith("tokenizer."))
        w.tensor("token_embd.weight", np.asarray(params["embed"], np.float32))
        for i in range(cfg.n_layers):
            b = f"blk.{i}."
            w.tensor(b + "attn_norm.weight", lay["attn_norm"][i])
            w.tensor(b + "attn_q.weight", _interleave_rope(lay["q"][i].T, cfg.n_heads))
            w.tensor(b + "attn_k.weight", _interleave_rope(lay["k"][i].T, cfg.n_kv_heads))
            w.tensor(b + "attn_v.weight", lay["v"][i].T)
            if cfg.qkv_bias:
                w.tensor(b + "attn_q.bias", _interleave_rope(lay["q_bias"][i], cfg.n_heads))
                w.tensor(b + "attn_k.bias", _interleave_rope(lay["k_bias"][i], cfg.n_kv_heads))
                w.tensor(b + "attn_v.bias", lay["v_bias"][i])
            w.tensor(b + "attn_output.weight", lay["o"][i].T)
            w.tensor(b + "ffn_norm.weight", lay["mlp_norm"][i])
            for name in ("gate", "up", "down"):
                w.tensor(b + f"ffn_{name}.weight", lay[name][i].T)
        w.tensor("output_norm.weight", np.asarray(params["final_norm"], np.float32))
        if not cfg.tie_embeddings:
            w.tensor("output.weight", np.asarray(params["lm_head"], np.float32).T)
        w.finish()

    return destinations.write_file(path, write, flag="path")


def _copy_fields(src: Any, writer: Any, keep: Any) -> None:
    """Copies the metadata fields of ``src`` (a GGUF file's path or its ``GGUFReader``) whose names pass
    ``keep`` into ``writer``."""
    from gguf import GGUFReader, GGUFValueType

    for name, field in (GGUFReader(src) if isinstance(src, str) else src).fields.items():
        if not keep(name):
            continue
        types = field.types
        sub_type = types[-1] if types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), types[0], sub_type=sub_type)


_NOT_COPIED = ("GGUF.", "general.architecture", "general.alignment", "general.file_type")


def requantize_gguf(src: str | readers.GGUFFileReader, dst: str, qtype: str, tokenizer: bool = True) -> str:
    """Re-quantises the GGUF file ``src`` (a path, or a reader opened once for several outputs) to ``dst`` at
    ``qtype``: every tensor dequantised (any type the reader
    reads) and stored as :func:`quantize_tensor` does; metadata copied (``general.file_type`` set to ``qtype``
    where llama.cpp names it; ``tokenizer=False`` leaves out the ``tokenizer.*`` keys, which the ``gguf``
    package takes most of its time to parse). Written atomically; returns ``dst``'s path.

    Raises:
      JaxindError: ``qtype`` is not writable, or ``src`` cannot be read.
    """
    reader = readers.GGUFFileReader(src) if isinstance(src, str) else src
    quantize_tensor(np.zeros(1, np.float32), qtype)
    arch = reader.reader.fields["general.architecture"].contents()

    def write(tmp: str) -> None:
        w = _Writer(tmp, str(arch), qtype)
        skip = _NOT_COPIED if tokenizer else (*_NOT_COPIED, "tokenizer.")
        _copy_fields(reader.reader, w.gguf, lambda k: not k.startswith(skip))
        _file_type(w)
        for name in reader.names():
            w.tensor(name, reader.load(name))
        w.finish()

    return destinations.write_file(dst, write, flag="dst")
