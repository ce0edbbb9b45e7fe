"""Helpers shared by the tests: param trees near or far from each other, running the command
lines in a child process against this checkout, and freezing them at named points
(:mod:`jaxind.testhooks`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax

from jaxind.models import model
from jaxind.models.config import ModelConfig

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


MODULES = {"main": "jaxind.main", "convert": "converters.convert", "sweep": "jaxind.sweep"}


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


def alias_bomb(levels: int = 9) -> str:
    """A sweep file of under 600 bytes whose nested YAML aliases make a parent of 9**levels strings."""
    parts = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    first = f"{{name: a, source: x, family: [{', '.join(parts)}], parent: *a{levels}}}"
    return f"models:\n  - {first}\n  - {{name: b, source: y}}\n"


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
            # Ctrl-C's default handling, even when the test run itself ignores SIGINT (a background job of a
            # non-interactive shell does, and its children inherit that).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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


# --- many models (sweeps, one-vs-many scans) -----------------------------------------------------------

SWEEP_CFG = ModelConfig(
    family="llama", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)


def numpy_params(cfg: ModelConfig, seed: int, std: float = 0.3):
    """An independent random model made with numpy (no compilation: fast in tests): every weight
    ``std * N(0, 1)``, every norm weight ``1 + std * N(0, 1)``; iid across seeds, so H0 holds."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))

    def fill(path, leaf):
        base = 1.0 if "norm" in jax.tree_util.keystr(path[-1:], simple=True) and not cfg.norm_offset else 0.0
        return (base + std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def numpy_noise(params, seed: int, scale: float):
    """``params`` with every leaf moved by ``scale * N(0, 1)`` (numpy, keyed by ``seed``): a fine-tune proxy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda w: (np.asarray(w) + scale * rng.standard_normal(w.shape)).astype(np.float32), params)


def prune_mlp(params, keep):
    """A copy of ``params`` keeping only MLP hidden units ``keep`` in every layer (gate/up columns,
    down rows), whatever the layer layout: the hidden axis is the last of gate/up and the one
    before last of down."""
    import jax.numpy as jnp

    keep = jnp.asarray(keep)

    def cut(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if name in ("gate", "up", "up_bias"):
            return jnp.take(leaf, keep, axis=-1)
        if name == "down":
            return jnp.take(leaf, keep, axis=-2)
        return leaf

    return jax.tree_util.tree_map_with_path(cut, params)


def save_jaxind(path: str, cfg: ModelConfig, params, name: str) -> str:
    """Writes a param tree as a jaxind checkpoint (a model source every CLI reads)."""
    from converters.checkpoint import groups_of, save_checkpoint

    save_checkpoint(path, cfg, groups_of(jax.tree.map(lambda x: jax.numpy.asarray(x), params)), {"source": name})
    return path


def sweep_zoo(root: str) -> dict[str, tuple[str, str | None]]:
    """Eight tiny models as jaxind checkpoints under ``root``: ``{name: (path, parent)}``.

    Two derived families (a base, a fine-tune proxy, and a permuted+rotated copy of the fine-tune;
    a base, a fine-tune proxy and a pruned copy with 48 of 64 MLP units) and two independent models.
    Related pairs: the 3 + 3 pairs inside each family.
    """
    import numpy as np

    from jaxind.models import symmetry

    cfg = SWEEP_CFG
    base1, base2 = numpy_params(cfg, seed=1), numpy_params(cfg, seed=2)
    ft1, ft2 = numpy_noise(base1, 11, 0.1), numpy_noise(base2, 12, 0.1)
    disguised = symmetry.apply_permutation(ft1, cfg, symmetry.draw_permutations(jax.random.key(13), cfg))
    disguised, cfg_rot = symmetry.rotate_residual(disguised, cfg, symmetry.random_orthogonal(jax.random.key(14), 32))
    keep = np.sort(np.random.default_rng(15).choice(cfg.d_ff, 48, replace=False))
    zoo = {
        "base1": (cfg, base1, None),
        "ft1": (cfg, ft1, "base1"),
        "permrot1": (cfg_rot, disguised, "ft1"),
        "base2": (cfg, base2, None),
        "ft2": (cfg, ft2, "base2"),
        "pruned2": (cfg.replace(d_ff=48), prune_mlp(base2, keep), "base2"),
        "ind1": (cfg, numpy_params(cfg, seed=3), None),
        "ind2": (cfg, numpy_params(cfg, seed=4), None),
    }
    return {name: (save_jaxind(os.path.join(root, name), c, p, name), parent) for name, (c, p, parent) in zoo.items()}
