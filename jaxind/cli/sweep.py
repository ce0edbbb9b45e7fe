"""The sweep's command line: ``python -m jaxind.sweep --config=sweep.yaml --output=DIR`` (the work itself is
:mod:`jaxind.many.sweep`).

Exit status: 0 when the sweep ran (whatever failed inside it; see ``summary.json``), 1 on bad
input (one ``error:`` line, before any model is loaded), 130 on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags

from jaxind.errors import JaxindError
from jaxind.io import caching  # noqa: F401  (defines --cache_dir and --compilation_cache)
from jaxind.many.sweep import finish, parse_shard, run_sweep
from jaxind.many.sweep_config import SweepConfig

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The sweep's own flags (defined when the CLI starts: ``--output`` is also jaxind.main's)."""
    flags.DEFINE_string(
        "config", None, "Sweep file (YAML): models, pairs, tests, data, alpha (see jaxind.many.sweep_config)."
    )
    flags.DEFINE_string("output", None, "Output folder: pairs/, summary.json, report.html (created; reruns resume).")
    flags.DEFINE_integer("workers", 1, "Local worker processes (models, then pairs, in parallel).", lower_bound=1)
    flags.DEFINE_string("shard", None, "i/n: run only pairs k with k % n == i (e.g. a SLURM array task).")
    flags.DEFINE_bool("report_only", False, "Only rebuild summary.json and the report from what --output holds.")


def preflight() -> tuple[SweepConfig, tuple[int, int]]:
    """Every check that needs no model: flags, the sweep file, the output folder."""
    from jaxind.io import destinations
    from jaxind.many import sweep_config

    if not FLAGS.config or not FLAGS.output:
        raise JaxindError("pass --config=SWEEP.yaml and --output=DIR")
    config = sweep_config.load(FLAGS.config)
    shard = parse_shard(FLAGS.shard)
    destinations.check_directory(FLAGS.output, "--output")
    if FLAGS.report_only and not os.path.isdir(os.path.join(FLAGS.output, "pairs")):
        raise JaxindError(f"--report_only: {FLAGS.output} holds no sweep (no pairs/ folder); run the sweep first")
    return config, shard


def run(argv: list[str]) -> int:
    from jaxind.io import assets

    del argv
    config, shard = preflight()
    if FLAGS.cache_dir:  # the flag overrides the file's cache_dir
        config = dataclasses.replace(config, cache_dir=os.path.abspath(os.path.expanduser(FLAGS.cache_dir)))
    store_root = os.path.abspath(os.path.expanduser(config.cache_dir or assets.cache_dir()))
    if os.path.lexists(store_root) and not os.path.isdir(store_root):
        raise JaxindError(f"the jaxind cache {store_root} is a file, not a directory: pass another --cache_dir")
    caching.apply_cache_dir(config.cache_dir)
    caching.enable_compilation_cache(caching.compilation_cache_dir(FLAGS.compilation_cache))
    if FLAGS.report_only:
        finish(config, FLAGS.output)
        return 0
    run_sweep(config, FLAGS.output, workers=FLAGS.workers, shard=shard, log=lambda m: print(m, flush=True))
    return 0


def main(argv: list[str]) -> None:
    from jaxind.cli.cli_utils import run_reporting_errors

    run_reporting_errors(
        lambda: run(argv),
        interrupted=lambda: "finished pairs are kept: rerun the same command to resume",
    )


def entry_point() -> None:
    from jaxind.cli.cli_utils import parse_flags

    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry_point()
