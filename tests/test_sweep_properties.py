"""Generated sweep files and CLI flag sets (hypothesis): whatever the input, the contract holds.

A run either succeeds (exit 0 and a valid results JSON) or fails with exit 1, exactly one ``error:``
line and no traceback. Most examples go through the checks that run before any model is loaded, in
this process (``sweep_config.load``; ``jaxind.main``'s flag parsing, ``preflight`` and settings); a
few run the real CLIs (``python -m jaxind.sweep``, ``python -m jaxind.main``) on tiny models. The
examples are derandomized (the same on every run and machine) and kept few: a 2-core CI box runs
this file in about a minute and a half.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, SWEEP_CFG, alias_bomb, cli_env, error_lines, numpy_noise, numpy_params, save_jaxind
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jaxind.errors import JaxindError
from jaxind.many import sweep_config

IN_PROCESS = settings(
    max_examples=40, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
SUBPROCESS = settings(
    max_examples=3, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Three tiny jaxind checkpoints (Llama, d=32, 2 layers): base, a noisy copy, an independent one."""
    root = tmp_path_factory.mktemp("props")
    base = numpy_params(SWEEP_CFG, seed=0)
    return {
        "base": save_jaxind(str(root / "base"), SWEEP_CFG, base, "base"),
        "ft": save_jaxind(str(root / "ft"), SWEEP_CFG, numpy_noise(base, 1, 0.05), "ft"),
        "ind": save_jaxind(str(root / "ind"), SWEEP_CFG, numpy_params(SWEEP_CFG, seed=7), "ind"),
        "root": str(root),
    }


# --- sweep files ------------------------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),  # lone surrogates included: YAML escapes them
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "kind", "1"]), st.integers(), max_size=2),
)
NAMES = st.one_of(
    st.sampled_from(["base", "ft", "ind", "m.1", "a+b", "x-y"]),
    st.sampled_from(["", "a\n", "a__b", "a/b", "n" * 65, "-x", " a"]),
    JUNK,
)
SMALL_DATA = st.fixed_dictionaries(
    {"kind": st.just("random"), "num_sequences": st.integers(2, 3), "seq_len": st.integers(4, 6)},
    optional={"seed": st.integers(0, 3)},
)


def _models(paths: dict[str, str]) -> st.SearchStrategy[list[dict[str, Any]]]:
    """2-4 plausible model entries (unique names; some with a parent named before them)."""
    sources = [paths["base"], paths["ft"], paths["ind"], "/nonexistent"]

    def entries(names: list[str], parents: list[int]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"name": n, "source": sources[i % 4]} for i, n in enumerate(names)]
        for i, p in enumerate(parents[: len(out)]):
            if 0 <= p < i:
                out[i]["parent"] = names[p]
        return out

    names = st.lists(st.sampled_from(["base", "ft", "ind", "m.1", "a+b"]), min_size=2, max_size=4, unique=True)
    return st.builds(entries, names, st.lists(st.integers(-1, 3), max_size=4))


def sweep_files(paths: dict[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    """Sweep file contents: plausible keys (some with values out of range), and at most one key (or a
    model's field) replaced by a generated value of any type."""
    plausible = st.fixed_dictionaries(
        {"models": _models(paths)},
        optional={
            "pairs": st.sampled_from(["all", {"bases": ["base"], "derived": ["ft", "ind"]}, [["base", "ft"]]]),
            "tests": st.one_of(st.lists(st.sampled_from(["csu", "match", "l2", "bogus"]), max_size=3), st.just("csu")),
            "data": SMALL_DATA,
            "alpha": st.floats(-0.5, 1.5),
            "correction": st.sampled_from(["holm", "bonferroni", "fdr"]),
            "num_perms": st.integers(0, 9),
            "layers": st.one_of(st.sampled_from(["0", "0:2", "x", "2:1", "-1"]), st.lists(st.integers(-1, 2))),
            "layer_pairs": st.lists(st.lists(st.integers(-1, 2), min_size=2, max_size=2), max_size=2),
            "dtype": st.sampled_from(["float32", "bfloat16", "f16"]),
        },
    )
    where = st.sampled_from(
        ["models", "pairs", "tests", "data", "alpha", "correction", "num_perms", "layers", "layer_pairs", "dtype"]
        + ["cache_dir", "generalized_steps", 1, "colour", "models.name", "models.parent", "models.family"]
        + ["models.source", "models.colour", "pairs.bases", "data.kind", "data.seed", "data.tokenizer"]
    )
    return st.tuples(plausible, st.one_of(st.none(), st.tuples(where, st.one_of(NAMES, JUNK)))).map(_break)


def _break(pair: tuple[dict[str, Any], tuple[Any, Any] | None]) -> dict[str, Any]:
    """``content`` with the value at ``where`` ("models.name": the first model's name) replaced."""
    content, broken = pair
    if broken is None:
        return content
    where, value = broken
    head, _, field = str(where).partition(".")
    if not field:
        return {**content, where: value}
    inner = content.get(head)
    if head == "models":
        return {**content, "models": [{**inner[0], field: value}, *inner[1:]]}
    return {**content, head: {**(inner if isinstance(inner, dict) else {}), field: value}}


def _yaml_text(content: dict[str, Any], mangle: int) -> str:
    text = yaml.safe_dump(content, sort_keys=False)
    if mangle == 1:
        return alias_bomb(mangle + 2)
    if mangle == 2:
        return text + "\t: [\n"  # not YAML
    return text


def _one_line_error(e: JaxindError) -> None:
    message = str(e)
    assert message and "\n" not in message and len(message) < 2000, message


def test_generated_sweep_files_load_or_give_one_line(models, tmp_path_factory):
    """``sweep_config.load`` returns a config or raises one short line; never anything else."""
    folder = tmp_path_factory.mktemp("yaml")

    @IN_PROCESS
    @given(content=sweep_files(models), mangle=st.sampled_from([0] * 8 + [1, 2]))
    def check(content: dict[str, Any], mangle: int) -> None:
        path = folder / "s.yaml"
        path.write_text(_yaml_text(content, mangle), encoding="utf-8")
        try:
            config = sweep_config.load(str(path))
        except sweep_config.SweepConfigError as e:
            _one_line_error(e)
            return
        assert len(config.models) >= 2 and config.pairs and config.tests
        assert all(len(m.name) <= sweep_config.NAME_MAX and "\n" not in m.name for m in config.models)

    check()


# --- the main CLI's flags ---------------------------------------------------------------------------------


def _flag_sets(paths: dict[str, str], tmp: Path) -> st.SearchStrategy[list[str]]:
    """``jaxind.main`` argument lists: two tiny models plus flags with good and bad values."""
    text = str(tmp / "corpus.txt")
    good_and_bad = {  # a few good values, then bad ones: a bad value in about a third of the flags
        "tests": (["csu", "csu,match", "match", "l2"], ["bogus", ""]),
        "num_perms": (["9", "19"], ["0", "-1", "x"]),
        "num_sequences": (["2", "3"], ["0", "1e3"]),
        "seq_len": (["4", "6"], ["1", "-4"]),
        "batch_size": (["2", "8"], ["0"]),
        "seed": (["0", "3"], ["-1", str(2**64)]),
        "alpha": (["0.05", "0.5"], ["0", "1", "nan", "inf", "x"]),
        "dtype": (["float32", "bfloat16"], ["float16"]),
        "layers": (["0", "0:2", "1,0"], ["x", "2:1", "-1"]),
        "data": (["random", f"text:{text}"], ["text:/nonexistent.txt", "csv:x", "jsonl:"]),
        "output": ([str(tmp / "r.json")], [str(tmp), str(tmp / "file.txt" / "r.json")]),
    }
    values = {
        name: st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(bad))
        for name, (good, bad) in good_and_bad.items()
    }
    chosen = st.lists(st.sampled_from(sorted(values)), unique=True, max_size=4)
    pairs = [[f"--model_a={paths['base']}", f"--model_b={paths[b]}"] for b in ("ft", "ind", "ft")]
    odd = [[f"--model_a={paths['base']}"], [f"--model_a={paths['base']}", "--model_b=/x"]]
    models = st.one_of(st.sampled_from(pairs), st.sampled_from(pairs), st.sampled_from(odd))
    return st.tuples(models, chosen).flatmap(
        lambda mc: st.tuples(*[values[name].map(lambda v, n=name: f"--{n}={v}") for name in mc[1]]).map(
            lambda picked: [*mc[0], "--num_sequences=2", "--seq_len=4", "--num_perms=9", *picked]
        )
    )


def _main_checks(argv: list[str]) -> str | None:
    """The main CLI's checks before any model loads, in this process: None when they pass, else the
    one line the CLI would print (flag errors as :func:`jaxind.cli.cli_utils.parse_flags` reports them)."""
    from absl import flags

    from jaxind.cli import main

    main.FLAGS.unparse_flags()
    try:
        main.FLAGS(["jaxind", *argv])
        main.preflight().settings(writer=True)
        return None
    except flags.Error as e:
        return str(e)
    except JaxindError as e:
        _one_line_error(e)
        return str(e)
    finally:
        main.FLAGS.unparse_flags()


def _tmp_with_files(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("flags")
    (tmp / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (tmp / "file.txt").write_text("not a folder")
    return tmp


def test_generated_main_flags_pass_or_give_one_line(models, tmp_path_factory):
    tmp = _tmp_with_files(tmp_path_factory)

    @IN_PROCESS
    @given(argv=_flag_sets(models, tmp))
    def check(argv: list[str]) -> None:
        problem = _main_checks(argv)
        if problem is not None:
            assert problem.strip(), argv

    check()


# --- the real command lines, a few examples ------------------------------------------------------------------


def _assert_contract(result: subprocess.CompletedProcess, results_json: Path) -> bool:
    """exit 0 with a valid results JSON, or exit 1 with one error line; no traceback. True on success."""
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    if result.returncode == 0:
        assert results_json.is_file(), result.stdout[-2000:]
        return True
    assert result.returncode == 1 and len(error_lines(result.stderr)) == 1, (result.returncode, result.stderr[-3000:])
    return False


def _run(module: str, argv: list[str], cache: str) -> subprocess.CompletedProcess:
    env = cli_env(JAXIND_CACHE=cache, JAXIND_COMPILATION_CACHE=os.path.join(cache, "jax"))
    return subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )


def test_generated_sweeps_run_or_give_one_line(models, tmp_path_factory):
    """``python -m jaxind.sweep`` on a valid sweep of the tiny models, with one key replaced by a
    generated value: a finished sweep whose pair JSONs are results JSONs, or one error line."""
    import jsonschema

    from jaxind.stats.results import RESULTS_SCHEMA

    valid = {
        "models": [{"name": n, "source": models[n]} for n in ("base", "ft")],
        "tests": ["csu", "match"],
        "num_perms": 9,
        "data": {"kind": "random", "num_sequences": 2, "seq_len": 4},
    }
    folder = tmp_path_factory.mktemp("sweeps")
    gone = {"name": "gone", "source": "/nonexistent"}  # a model that fails: recorded, the sweep goes on
    pool = {
        "tests": [["csu"], ["bogus"], "csu,match"],
        "alpha": [0.2, 1.5, "x"],
        "pairs": [[["base", "ft"]], {"bases": "base", "derived": 5}],
        "models": [[*valid["models"], gone], [{"name": "a\n", "source": models["base"]}, gone]],
        "layers": ["0", "2:1", [0, 1]],
        "data": [{"kind": "random", "num_sequences": 3, "seq_len": 4, "seed": 3}, {"kind": "text"}],
    }
    replaced = st.sampled_from(sorted(pool)).flatmap(
        lambda k: st.tuples(st.just(k), st.one_of(st.sampled_from(pool[k]), st.sampled_from(pool[k]), JUNK))
    )
    runs: list[bool] = []

    @SUBPROCESS
    @example(replaced=("models", pool["models"][0]))
    @given(replaced=replaced)
    def check(replaced: tuple[str, Any]) -> None:
        run = folder / str(len(runs))
        run.mkdir()
        body = {**valid, replaced[0]: replaced[1]}
        (run / "s.yaml").write_text(yaml.safe_dump(body))
        result = _run("jaxind.sweep", [f"--config={run / 's.yaml'}", f"--output={run / 'out'}"], str(folder / "c"))
        ok = _assert_contract(result, run / "out" / "summary.json")
        runs.append(ok)
        if ok:
            summary = json.loads((run / "out" / "summary.json").read_text())
            assert summary["complete"] and summary["counts"]["pairs"] >= 1
            for pair in (run / "out" / "pairs").glob("*.json"):
                jsonschema.validate(json.loads(pair.read_text()), RESULTS_SCHEMA)

    check()
    assert len(runs) == SUBPROCESS.max_examples + 1 and runs[0]  # the explicit example finishes


def test_generated_main_runs_finish_or_give_one_line(models, tmp_path_factory):
    """``python -m jaxind.main`` with generated flags: the results JSON or one error line, and the
    in-process checks agree with the CLI about flags that fail before any model loads."""
    import jsonschema

    from jaxind.stats.results import RESULTS_SCHEMA

    tmp = _tmp_with_files(tmp_path_factory)
    runs: list[bool] = []

    @SUBPROCESS
    @given(argv=_flag_sets(models, tmp))
    def check(argv: list[str]) -> None:
        output = tmp / f"run{len(runs)}.json"
        argv = [a for a in argv if not a.startswith("--output=")] + [f"--output={output}"]
        early = _main_checks(argv)
        result = _run("jaxind.main", argv, str(tmp / "c"))
        ok = _assert_contract(result, output)
        runs.append(ok)
        if early is not None:
            assert not ok and "model_a:" not in result.stdout, (argv, early)
        if ok:
            jsonschema.validate(json.loads(output.read_text()), RESULTS_SCHEMA)

    check()
    assert len(runs) == SUBPROCESS.max_examples
