"""Layer selections: which layers of A are compared with which layers of B.

Every layer-wise test (CSU, CSH, L2's per-layer records, MATCH, localized, generalized) takes
``layers``: ``None`` (layer ``i`` of A against layer ``i`` of B for ``i < min(L_A, L_B)``), a
sequence of layer indices (each compared with the same index in the other model), or a sequence
of explicit ``(layer_a, layer_b)`` pairs. The command line spells these ``--layers=0,5,14`` or
``--layers=10:20`` (a Python-style half-open range: 10 to 19) and ``--layer_pairs=14:14,3:5``
(:func:`parse_layers`, :func:`parse_layer_pairs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jaxind.errors import JaxindError
from jaxind.models.config import ModelConfig
from jaxind.types import LayerPair

__all__ = [
    "LayerSelectionError",
    "Layers",
    "MAX_LAYERS",
    "check_flags",
    "check_pairs",
    "default_pairs",
    "normalize_layers",
    "parse_layer_pairs",
    "parse_layers",
    "resolve_pairs",
    "same_layer_pairs",
]

# What a test's ``layers=`` accepts.
Layers = Sequence[int] | Sequence[LayerPair] | None


class LayerSelectionError(JaxindError, ValueError):
    """A layer index out of range, an empty selection, or an unreadable ``--layers`` value."""


def default_pairs(cfg_a: ModelConfig, cfg_b: ModelConfig) -> tuple[LayerPair, ...]:
    """Layer ``i`` of A against layer ``i`` of B for ``i < min(L_A, L_B)``."""
    return tuple((i, i) for i in range(min(cfg_a.n_layers, cfg_b.n_layers)))


def check_pairs(
    pairs: Iterable[Sequence[int]], cfg_a: ModelConfig, cfg_b: ModelConfig, test: str = "this test"
) -> tuple[LayerPair, ...]:
    """``pairs`` as a tuple of int pairs, each in range for its model.

    Raises:
      LayerSelectionError: no pairs, or an index outside ``[0, L)`` of its model.
    """
    out = tuple((int(a), int(b)) for a, b in pairs)
    if not out:
        raise LayerSelectionError(f"{test} needs at least one layer pair")
    for a, b in out:
        if not (0 <= a < cfg_a.n_layers and 0 <= b < cfg_b.n_layers):
            raise LayerSelectionError(
                f"layer pair ({a}, {b}) out of range for models with {cfg_a.n_layers} and {cfg_b.n_layers} layers"
            )
    return out


def resolve_pairs(
    layers: Layers, cfg_a: ModelConfig, cfg_b: ModelConfig, test: str = "this test"
) -> tuple[LayerPair, ...]:
    """A ``layers=`` argument (see the module doc) as checked ``(layer_a, layer_b)`` pairs."""
    if layers is None:
        return check_pairs(default_pairs(cfg_a, cfg_b), cfg_a, cfg_b, test)
    items = list(layers)
    if all(isinstance(item, int) for item in items):
        return check_pairs([(i, i) for i in items], cfg_a, cfg_b, test)  # type: ignore[misc]
    if all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        return check_pairs(items, cfg_a, cfg_b, test)  # type: ignore[arg-type]
    raise LayerSelectionError(f"{test}: layers must be layer indices or (layer_a, layer_b) pairs, got {layers!r}")


def same_layer_pairs(pairs: Sequence[LayerPair], test: str) -> tuple[int, ...]:
    """The layers of pairs that compare layer ``l`` with layer ``l`` (tests on one architecture).

    Raises:
      LayerSelectionError: a pair ``(a, b)`` with ``a != b``.
    """
    mixed = [p for p in pairs if p[0] != p[1]]
    if mixed:
        raise LayerSelectionError(f"{test} compares layer l of A with layer l of B; it cannot compare pairs {mixed}")
    return tuple(a for a, _ in pairs)


def normalize_layers(cfg: ModelConfig, layers: Iterable[int] | None) -> tuple[int, ...]:
    """A layer selection of one model (None = all layers; negative indices count from the end)
    as a sorted tuple of distinct indices.

    Raises:
      LayerSelectionError: an index out of range.
    """
    if layers is None:
        return tuple(range(cfg.n_layers))
    out = []
    for layer in layers:
        index = layer + cfg.n_layers if layer < 0 else layer
        if not 0 <= index < cfg.n_layers:
            raise LayerSelectionError(f"layer {layer} out of range for a {cfg.n_layers}-layer model")
        out.append(index)
    return tuple(sorted(set(out)))


MAX_LAYERS = 100_000  # more than any model has: a larger index is refused before any range is expanded


def _index(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise LayerSelectionError(f"{flag}: {text!r} is not a layer index (use e.g. 0,5,14 or 10:20)") from None
    if value < 0:
        raise LayerSelectionError(f"{flag}: layer indices start at 0, got {value}")
    if value > MAX_LAYERS:
        raise LayerSelectionError(
            f"{flag}: layer index {value} is past any model's depth (at most {MAX_LAYERS:,} layers here): "
            "pick layers below the models' layer count"
        )
    return value


def parse_layers(text: str, flag: str = "--layers") -> tuple[int, ...]:
    """``"0,5,14"`` -> ``(0, 5, 14)``; ``"10:20"`` -> ``(10, ..., 19)``; parts combine: ``"0,10:12"``.

    Every index is checked (at most :data:`MAX_LAYERS`) before a range is expanded, so a huge range
    is refused at once instead of filling memory.

    Raises:
      LayerSelectionError: an unreadable part, a negative or huge index, or an empty range.
    """
    spans: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if ":" in part:
            start, _, stop = part.partition(":")
            lo, hi = _index(start, flag), _index(stop, flag)
            if hi <= lo:
                raise LayerSelectionError(f"{flag}: range {part!r} is empty (a:b means layers a to b-1)")
            spans.append((lo, hi))
        else:
            index = _index(part, flag)
            spans.append((index, index + 1))
    return tuple(dict.fromkeys(i for lo, hi in spans for i in range(lo, hi)))


def parse_layer_pairs(text: str, flag: str = "--layer_pairs") -> tuple[LayerPair, ...]:
    """``"14:14,3:5"`` -> ``((14, 14), (3, 5))`` (layer of A : layer of B).

    Raises:
      LayerSelectionError: a part that is not ``a:b`` with two layer indices.
    """
    out: list[LayerPair] = []
    for part in (p.strip() for p in text.split(",")):
        a, sep, b = part.partition(":")
        if not sep:
            raise LayerSelectionError(f"{flag}: {part!r} is not a pair layer_a:layer_b (use e.g. 14:14,3:5)")
        out.append((_index(a, flag), _index(b, flag)))
    return tuple(dict.fromkeys(out))


def check_flags(
    layers: Sequence[int] | None, layer_pairs: Sequence[LayerPair] | None, cfg_a: ModelConfig, cfg_b: ModelConfig
) -> None:
    """Checks parsed ``--layers`` / ``--layer_pairs`` against the two models' configs (before their weights load).

    Raises:
      LayerSelectionError: an index past a model's last layer, naming the flag and the layer counts.
    """
    if layers:
        top, depth = max(layers), min(cfg_a.n_layers, cfg_b.n_layers)
        if top >= depth:
            have = (
                f"the models have {depth} layers"
                if cfg_a.n_layers == cfg_b.n_layers
                else f"model A has {cfg_a.n_layers} layers and model B {cfg_b.n_layers}"
            )
            raise LayerSelectionError(f"--layers names layer {top}, but {have}: pick layers 0 to {depth - 1}")
    if layer_pairs:
        bad = [(a, b) for a, b in layer_pairs if a >= cfg_a.n_layers or b >= cfg_b.n_layers]
        if bad:
            raise LayerSelectionError(
                f"--layer_pairs names pair {bad[0][0]}:{bad[0][1]}, but model A has {cfg_a.n_layers} layers and "
                f"model B {cfg_b.n_layers}: pick pairs a:b with a < {cfg_a.n_layers} and b < {cfg_b.n_layers}"
            )
