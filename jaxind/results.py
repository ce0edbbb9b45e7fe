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
from jaxind import destinations


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
    """Writes ``document`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    The file gets the mode a plain ``open()`` would give it (``0o666`` less the umask), also when
    it replaces an existing file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        os.fchmod(fd, destinations.file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(document), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rescue_path(path: str) -> str:
    """Where results go when ``path`` cannot be written: the temp folder, named after ``path``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"jaxind-{os.path.splitext(os.path.basename(path))[0] or 'results'}-{stamp}-{os.getpid()}.json"
    return os.path.join(tempfile.gettempdir(), name)


def write_json_or_rescue(path: str, document: dict) -> None:
    """:func:`write_json`, never losing the results: if ``path`` cannot be written (disk full, the
    folder removed meanwhile, ...), they are written to :func:`rescue_path`, or else printed on
    stdout, and a JaxindError says where they are.

    Raises:
      JaxindError: ``path`` was not written (the message says where the results went).
    """
    try:
        write_json(path, document)
        return
    except OSError as e:
        problem = f"cannot write {path} ({e.strerror or type(e).__name__})"
    fallback = rescue_path(path)
    try:
        write_json(fallback, document)
    except OSError:
        print(json.dumps(_jsonable(document), indent=2), flush=True)
        raise jaxind.JaxindError(f"{problem}, nor {fallback}: the results JSON is printed on stdout instead; "
                                 "free some space or choose another --output") from None
    raise jaxind.JaxindError(f"{problem}: the results were saved to {fallback} instead; move them where they belong")
