"""Multi-host on one machine (docs/DESIGN.md §5.10): `python -m jaxind.main --flagfile=...` run as two JAX
processes (2 CPU devices each, JAX's CPU collectives over gloo, jax.distributed from the flags) writes a results
file identical, but for timestamps and seconds, to one process with 4 devices; only process 0 writes it."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from helpers import REPO, cli_env, perturb, random_params

from converters import checkpoint
from jaxind.config import ModelConfig

CFG = ModelConfig("qwen2", vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
VOLATILE = ("created", "seconds", "seconds_pass", "seconds_lap")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(flagfile: str, devices: int, *extra: str) -> subprocess.Popen:
    env = cli_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "jaxind.main", f"--flagfile={flagfile}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _stable(document):
    """The results document without what differs between any two runs (timestamps and timings)."""
    if isinstance(document, dict):
        return {k: _stable(v) for k, v in document.items() if k not in VOLATILE}
    if isinstance(document, list):
        return [_stable(v) for v in document]
    return document


def test_two_processes_write_what_one_process_writes(tmp_path):
    params_a = random_params(CFG, seed=1, std=0.3, noise=0.1)
    params_b = perturb(params_a, jax.random.key(2), rel=3.0, std=0.3)
    for name, params in (("A", params_a), ("B", params_b)):
        groups = checkpoint.groups_of(jax.tree.map(np.asarray, params))
        checkpoint.save_checkpoint(str(tmp_path / name), CFG, groups, {"source": name})
    flagfile = tmp_path / "pod.flags"  # the same flagfile for every process
    flagfile.write_text(
        f"--model_a={tmp_path / 'A'}\n--model_b={tmp_path / 'B'}\n--tests=csu,csh,match,l2,jsd\n--data=random\n"
        "--num_sequences=8\n--seq_len=16\n--batch_size=4\n--num_perms=63\n--mesh=fsdp:-1\n--permtest_layer_shards=4\n"
    )
    one = _main(str(flagfile), 4, f"--output={tmp_path / 'one.json'}")
    _, err = one.communicate(timeout=600)
    assert one.returncode == 0, err[-3000:]

    two_dir = tmp_path / "two"
    two_dir.mkdir()
    address = f"--coordinator_address=127.0.0.1:{_free_port()}"
    procs = [
        _main(str(flagfile), 2, f"--output={two_dir / 'r.json'}", address, "--num_processes=2", f"--process_id={i}")
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "results written to" in outputs[0][0]
    assert "results are written by process 0 (this is process 1)" in outputs[1][0]
    assert os.listdir(two_dir) == ["r.json"]

    with open(tmp_path / "one.json") as f:
        single = json.load(f)
    with open(two_dir / "r.json") as f:
        multi = json.load(f)
    assert _stable(multi) == _stable(single)
    tests = single["tests"]
    assert set(tests) == {"csu", "csh", "match", "l2", "jsd"} and all(t["error"] is None for t in tests.values())
    assert 1 / 64 <= tests["l2"]["pvalue"] <= 1 and tests["jsd"]["statistic"] > 0
