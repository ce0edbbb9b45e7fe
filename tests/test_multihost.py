"""Multi-host on one machine (docs/DESIGN.md §5.12): `python -m jaxind.main --flagfile=...` run as two JAX
processes by launch/cpu_processes.sh (2 CPU devices each, JAX's CPU collectives over gloo, jax.distributed from
the flags) writes a results file identical, but for timestamps and seconds, to one process with 4 devices; only
process 0 writes it. The pod flagfiles in configs/ parse, and the launchers are valid shell."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from helpers import REPO, cli_env, perturb, random_params

from converters import checkpoint
from jaxind.models.config import ModelConfig

CFG = ModelConfig("qwen2", vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
VOLATILE = ("created", "seconds", "seconds_pass", "seconds_grams", "seconds_lap", "timing")


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

    two_dir = tmp_path / "two"  # launch/cpu_processes.sh: 2 processes x 2 CPU devices, logs in the cwd
    two_dir.mkdir()
    launcher = os.path.join(REPO, "launch", "cpu_processes.sh")
    run = subprocess.run(
        [launcher, "2", "2", str(flagfile), f"--output={two_dir / 'r.json'}"],
        capture_output=True,
        text=True,
        cwd=two_dir,
        env=cli_env(),
        timeout=600,
    )
    logs = [(two_dir / f"jaxind-proc-{i}.log").read_text() for i in (0, 1)]
    assert run.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
    assert "results written to" in logs[0]
    assert "results are written by process 0 (this is process 1)" in logs[1]
    assert sorted(os.listdir(two_dir)) == ["jaxind-proc-0.log", "jaxind-proc-1.log", "r.json"]

    with open(tmp_path / "one.json") as f:
        single = json.load(f)
    with open(two_dir / "r.json") as f:
        multi = json.load(f)
    assert _stable(multi) == _stable(single)
    tests = single["tests"]
    assert set(tests) == {"csu", "csh", "match", "l2", "jsd"} and all(t["error"] is None for t in tests.values())
    assert 1 / 64 <= tests["l2"]["pvalue"] <= 1 and tests["jsd"]["statistic"] > 0


def test_pod_flagfiles_parse_and_their_meshes_fit():
    """configs/ pod examples: every flag is known and valid, the PERMTEST layer shards divide the mesh and the
    batch splits over data x fsdp."""
    script = (
        "import math, jaxind.cli.main; from absl import flags; from jaxind.parallel import cluster; F = flags.FLAGS\n"
        "for name in ('llama2_7b_8gpu', 'llama2_70b_tpu_pod'):\n"
        "    F.unparse_flags(); F(['jaxind', f'--flagfile=configs/{name}.flags'])\n"
        "    mesh = cluster.parse_mesh(F.mesh); n = math.prod(mesh.values())\n"
        "    print(name, n, n % F.permtest_layer_shards, F.batch_size % (mesh.get('data', 1) * mesh['fsdp']))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["llama2_7b_8gpu", "8", "0", "0", "llama2_70b_tpu_pod", "64", "0", "0"]
    for script_path in ("launch/tpu_pod.sh", "launch/slurm.sbatch", "launch/cpu_processes.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(REPO, script_path)]).returncode == 0, script_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_start_with_a_missing_process_ends_with_one_line_within_the_timeout():
    """Issue 19: --num_processes=2 with only one process started. Process 0 alone says which process is missing
    while it waits and ends with one error line naming it; process 1 alone says it waits for process 0 and ends
    with one line; both within --distributed_timeout (12 s here; before: a silent wait of minutes, then JAX's
    C++ abort with a stack dump)."""
    timeout = 12
    started = {}
    for process_id in (0, 1):  # two separate runs (other ports), each missing its peer
        argv = [
            "--demo_quick",
            f"--coordinator_address=127.0.0.1:{_free_port()}",
            "--num_processes=2",
            f"--process_id={process_id}",
            f"--distributed_timeout={timeout}",
        ]
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxind.main", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=cli_env(JAX_PLATFORMS="cpu"),
        )
        started[process_id] = (proc, time.monotonic())
    expected = {
        0: ("waiting for 1 of 2 processes (process id 1) at 127.0.0.1:", "1 of 2 processes (process id 1) did not"),
        1: ("process 1 waiting for process 0 to listen at 127.0.0.1:", "process 1 of 2: process 0 at 127.0.0.1:"),
    }
    for process_id, (proc, start) in started.items():
        out, err = proc.communicate(timeout=timeout + 120)
        seconds = time.monotonic() - start
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        progress, error = expected[process_id]
        assert proc.returncode == 1, err[-3000:]
        assert len(errors) == 1 and error in errors[0] and f"--distributed_timeout={timeout}s" in errors[0], err
        assert progress in err, err[-3000:]
        assert "Traceback" not in err and "Check failure" not in err and "building a small model zoo" not in out
        assert timeout <= seconds < timeout + 60, seconds  # the imports before the wait take seconds on a busy CI


def test_rendezvous_names_refuses_and_lets_go():
    """The handshake before jax.distributed (in threads of one process): addresses parsed, a process with another
    --num_processes or a taken --process_id refused with the reason, and the start goes on once all are there."""
    import concurrent.futures

    import pytest

    from jaxind.errors import JaxindError
    from jaxind.parallel import rendezvous

    assert rendezvous.parse_address("[::1]:1234") == ("::1", 1234)
    assert rendezvous.parse_address("node-7.cluster:65535") == ("node-7.cluster", 65535)
    for bad in ("host", "host:0", "host:65536", ":80", "host:http"):
        with pytest.raises(JaxindError, match="expected HOST:PORT"):
            rendezvous.parse_address(bad)
    address = f"127.0.0.1:{_free_port()}"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        host = pool.submit(rendezvous.host, address, 3, 60.0)
        with pytest.raises(JaxindError, match="refused this process: --num_processes=2 here but 3 on process 0"):
            rendezvous.join(address, 2, 1, 30.0)
        first = pool.submit(rendezvous.join, address, 3, 1, 60.0)
        time.sleep(1.0)
        with pytest.raises(JaxindError, match="--process_id=1 is taken by another process"):
            rendezvous.join(address, 3, 1, 30.0)
        assert not host.done()
        rendezvous.join(address, 3, 2, 30.0)
        assert host.result(timeout=30) is None and first.result(timeout=30) is None


def test_the_watchdog_ends_a_call_stuck_in_native_code_with_one_line():
    """What bounds jax.distributed's own connection: a call that does not return (here a sleep; there C++ that
    would abort much later) ends the process with one error line and exit 1 at the deadline."""
    script = (
        "import time\nfrom jaxind.parallel import rendezvous\n"
        "rendezvous.bounded(lambda: time.sleep(99), 2, 'w', 'gave up')"
    )
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert r.returncode == 1 and r.stderr.strip() == "error: gave up", r.stderr[-2000:]
    assert time.monotonic() - start < 60
