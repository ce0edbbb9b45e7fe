"""Helpers shared by the tests: param trees near or far from each other, running the command
lines in a child process against this checkout, and freezing them at named points
(:mod:`jaxind.testhooks`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax

from jaxind import model
from jaxind.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_noise(params, key, scale):
    """A copy of ``params`` with every leaf moved by ``scale * N(0, 1)`` (one key per leaf)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [w + scale * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])


def perturb(params, key, rel=0.5, std=0.02):
    """A copy of ``params`` with every leaf moved by N(0, (rel * std)^2): with ``std`` the init
    scale, ``rel=0.5`` is a fine-tune proxy and ``rel=3`` a weak relation."""
    return add_noise(params, key, rel * std)


def near_copy(params, seed, scale=1e-2):
    """``params`` moved by ``scale * N(0, 1)`` per entry, keyed by ``seed``."""
    return add_noise(params, jax.random.key(seed), scale)


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.3, noise: float = 0.3, noise_offset: int = 1000):
    """An independent random model whose norm weights and biases are randomised too (iid across
    seeds, so the null holds), so that folding and every leaf's role are really exercised:
    ``init_params(std)`` plus ``noise * N(0, 1)`` keyed by ``seed + noise_offset``."""
    params = model.init_params(cfg, jax.random.key(seed), std=std)
    return add_noise(params, jax.random.key(seed + noise_offset), noise)


def layer_list(params) -> list[dict]:
    """The stacked layers of a param tree as one dict per layer (for tests that edit single layers)."""
    layers = params["layers"]
    return [{name: leaf[l] for name, leaf in layers.items()} for l in range(next(iter(layers.values())).shape[0])]


def stack_layers(layers: list[dict]) -> dict:
    """One dict per layer -> the stacked ``params["layers"]`` (leading layer axis)."""
    return jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *layers)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args...`` in a child process, from the repository root, importing this
    checkout; output captured as text."""
    return run_python("-m", module, *args)


def run_python(*args: str) -> subprocess.CompletedProcess:
    """``python args...`` in a child process, from the repository root, importing this checkout."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=cli_env(), cwd=REPO)


MODULES = {"main": "jaxind.main", "convert": "converters.convert"}


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", **extra}


def run_cli(
    cli: str, argv: list[str], cwd: str = REPO, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """``python -m <jaxind.main | converters.convert> argv``, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", MODULES[cli], *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or cli_env(),
        **kwargs,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


class Frozen:
    """A CLI process started with ``JAXIND_TEST_STOP_AT=point`` and waited for until it stops there.

    Its stdout/stderr go to files under ``log_dir`` (a stopped process must not block on a pipe).
    """

    def __init__(self, cli: str, argv: list[str], point: str, log_dir: str, **env: str):
        os.makedirs(log_dir, exist_ok=True)
        self._out = open(os.path.join(log_dir, f"{point}.out"), "w+")
        self._err = open(os.path.join(log_dir, f"{point}.err"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULES[cli], *argv],
            stdout=self._out,
            stderr=self._err,
            cwd=REPO,
            env=cli_env(JAXIND_TEST_STOP_AT=point, **env),
        )
        _, status = os.waitpid(self.proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            raise AssertionError(f"{argv} did not reach {point}: exit {self.proc.returncode}\n{self.stderr()[-3000:]}")

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def stdout(self) -> str:
        self._out.seek(0)
        return self._out.read()

    def resume(self, sig: int | None = None, timeout: float = 300) -> int:
        """Delivers ``sig`` (if any), continues the process and waits for its exit status."""
        if sig is not None:
            os.kill(self.proc.pid, sig)
        os.kill(self.proc.pid, signal.SIGCONT)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        """SIGKILL, as a crash or ``kill -9`` would; returns once the process is gone."""
        self.proc.kill()
        return self.proc.wait(60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._out.close()
        self._err.close()
