"""A real SmolLM2 pair gives the results JSON of the release before the Flax module and the parameter table, bit for
bit (floats included), apart from timing and version fields (tests/stored_results.py). The quick demo's stored copy
is checked by the demo's own test (tests/test_cli.py), on the same run."""

import pytest
import stored_results


def test_strip_keeps_numbers_and_drops_only_timing_fields():
    doc = {
        "created": "x",
        "jaxind_version": "0.1",
        "tests": {"l2": {"seconds": 1.0, "seconds_pass": 2.0, "pvalue": 0.1}},
        "timing": {"trace": 1.0},
    }
    assert stored_results.strip(doc) == {"tests": {"l2": {"pvalue": 0.1}}}
    assert stored_results.strip({"source": "/tmp/a/m"}, {"/tmp/a": "<w>"}) == {"source": "<w>/m"}


@pytest.mark.slow  # the real model, converted twice: about 2 minutes
def test_smollm2_pair_results_unchanged(tmp_path, smollm2_torch):
    """(The noised copy is made from the session's transformers model: the GGUF is not read by transformers a
    second time.)"""
    docs = stored_results.smollm2_pair_results(str(tmp_path), read=smollm2_torch)
    assert docs == stored_results.stored("smollm2_pair.json")
