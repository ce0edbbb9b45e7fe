"""The results JSON (DESIGN.md §3): one file per model pair, written atomically.

Top level: ``jaxind_version``, ``created`` (UTC ISO time), ``seed``, ``model_a`` /
``model_b`` (what was loaded), ``data`` (token settings), ``alpha``, and ``tests``:
``{name: {"pvalue", "log10_pvalue", "statistic", "layers": [{"layer_a", "layer_b",
"pvalue", "log10_pvalue", "statistic", ...}], "seconds", "exact", "note"?}}``. Localized
testing adds ``localized`` (p-value matrix, layer map, matched units).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from typing import Any

import numpy as np

import jaxind


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) else (value if math.isfinite(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def make_results(model_a: dict, model_b: dict, data: dict, seed: int, tests: dict[str, Any], alpha: float = 0.05, **extra) -> dict:
    """Assembles the results document (plain JSON types; NaN becomes null)."""
    return _jsonable({
        "jaxind_version": jaxind.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "alpha": alpha,
        "model_a": model_a,
        "model_b": model_b,
        "data": data,
        "tests": tests,
        **extra,
    })


def write_json(path: str, document: dict) -> None:
    """Writes ``document`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(document), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
