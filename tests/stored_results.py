"""Reruns of the demo and of a real SmolLM2 pair, compared with results JSON stored from the release before the
Flax module and the parameter table (issue 16: "behaviour and every p-value unchanged").

Regenerate the stored copies (only on purpose, from a release whose numbers are the reference)::

    python tests/stored_results.py [demo_quick.json] [smollm2_pair.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fields that differ between two runs of the same code: wall-clock times, the date, the package version.
VOLATILE_PREFIXES = ("seconds", "created", "jaxind_version", "timing", "elapsed")

SMOLLM2_PAIR_ARGS = ("--tests=csu,l2,jsd,match", "--num_sequences=4", "--seq_len=32", "--num_perms=19")


def volatile(key: str) -> bool:
    """Whether a JSON key names a field that legitimately differs between runs (timing, versions, paths)."""
    return key.lower().startswith(VOLATILE_PREFIXES)


def strip(doc: Any, places: dict[str, str] | None = None) -> Any:
    """``doc`` without its volatile fields (recursively), the run's own folders in strings replaced by
    placeholders (``places``: ``{folder: name}``); everything else, floats included, as stored."""
    places = places or {}
    if isinstance(doc, dict):
        return {k: strip(v, places) for k, v in doc.items() if not volatile(k)}
    if isinstance(doc, list):
        return [strip(v, places) for v in doc]
    if isinstance(doc, str):
        for folder, name in places.items():
            doc = doc.replace(folder, name)
    return doc


def read_results(out: str) -> dict:
    """``{file name: results JSON}`` of a results file, or of every file in a results folder (the demo's)."""
    if os.path.isfile(out):
        with open(out) as f:
            return {os.path.basename(out): json.load(f)}
    docs = {}
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name)) as f:
            docs[name] = json.load(f)
    return docs


def run_cli(out: str, *args: str, cache: str) -> None:
    """``python -m jaxind.main ARGS --output=OUT`` from the repository root, with a cache of its own."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAXIND_CACHE": cache, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    r = subprocess.run(
        [sys.executable, "-m", "jaxind.main", *args, f"--output={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])


def demo_quick_results(workdir: str) -> dict:
    """The quick demo's results JSON (``python -m jaxind.main --demo_quick``: the demo's zoo and tests at a smaller
    size, the same code path as the built-in demo), written under ``workdir/demo``."""
    out = os.path.join(workdir, "demo")
    run_cli(out, "--demo_quick", "--nomodel_cache", cache=os.path.join(workdir, "cache"))
    return strip(read_results(out))


def noised_smollm2(path: str, out_dir: str, read: Any = None) -> str:
    """The real SmolLM2 GGUF read by transformers (or ``read``, that model already read: left unchanged), every
    weight moved by ``1e-3 * N(0, 1)`` (numpy, seed 0, in ``state_dict`` order), saved as a Hugging Face
    directory: a deterministic "fine-tuned" copy."""
    import copy

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    if read is None:
        read = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
    config = copy.deepcopy(read.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised on reading: saved as plain float32
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # a model read from GGUF cannot be saved
    m.load_state_dict(read.state_dict())
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for _, w in sorted(m.named_parameters()):  # tied weights once
            w += torch.from_numpy((1e-3 * rng.standard_normal(tuple(w.shape))).astype(np.float32))
    m.save_pretrained(out_dir)
    return out_dir


def smollm2_pair_results(workdir: str, read: Any = None) -> dict:
    """The results JSON of SmolLM2 against its noised copy (:func:`noised_smollm2`; ``read``: the GGUF already
    read by transformers), small data."""
    from jaxind.io.assets import smollm2_gguf

    path = smollm2_gguf()
    other = noised_smollm2(path, os.path.join(workdir, "smollm2-noised"), read)
    out = os.path.join(workdir, "smollm2_pair.json")
    run_cli(out, f"--model_a={path}", f"--model_b={other}", "--nomodel_cache", *SMOLLM2_PAIR_ARGS, cache=workdir)
    return strip(read_results(out), {workdir: "<workdir>", os.path.dirname(path): "<smollm2>"})


def stored(name: str) -> dict:
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def main(names: list[str]) -> None:
    os.makedirs(FIXTURES, exist_ok=True)
    for name, make in (("demo_quick.json", demo_quick_results), ("smollm2_pair.json", smollm2_pair_results)):
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            doc = make(tmp)
        with open(os.path.join(FIXTURES, name), "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)  # Python's float repr round-trips: bit-identical floats
        print("wrote", name)


if __name__ == "__main__":
    main(sys.argv[1:])
