"""Converts a checkpoint into a jaxind (orbax) checkpoint.

    python -m converters.convert --src=PATH_OR_GGUF --out=DIR [--overwrite] [--tokenizer]

SRC is a Hugging Face model directory (config.json + safetensors or pytorch_model*.bin,
sharded or not), a .gguf file (dequantised to float32), or an alias (``smollm2``, ``gemma3-270m``). Tensors are
streamed one at a time; the converter holds one float32 copy of the model at most.

``--out`` is never replaced without ``--overwrite``, even by a second convert racing to it;
with ``--overwrite`` it is swapped atomically (always the old or the new checkpoint). Hidden
``.tmp-<name>@...`` directories left beside ``--out`` by a killed run are removed by the next run
to the same ``--out`` (see converters/publish.py). Ctrl-C removes the partial checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Checkpoint to convert: HF model dir, .gguf file, 'smollm2' or 'gemma3-270m'.")
flags.DEFINE_string("out", None, "Output directory for the jaxind (orbax) checkpoint.")
flags.DEFINE_bool(
    "overwrite", False, "Replace --out if it is a jaxind checkpoint (atomic swap: always the old or the new)."
)
flags.DEFINE_bool(
    "tokenizer",
    True,
    "Also save the source's tokenizer (GGUF tokenizers are rebuilt from the file's "
    "metadata); a tokenizer the source has but that cannot be read is an error.",
)


def preflight(src: str, out: str, overwrite: bool) -> str:
    """Every check that needs no weights, made before the slow part (and, from the CLI, before
    JAX is imported): the source exists, ``out`` can be written and is free (or ``overwrite``).
    Repairs and removes what killed earlier conversions to ``out`` left. Returns the source path.

    Raises:
      JaxindError: one line saying what is wrong.
    """
    from converters import publish, sources
    from jaxind.errors import CheckpointError
    from jaxind.io import destinations

    destinations.check_directory(out, "--out", in_place=False)
    path = sources.resolve(src)
    publish.clean_stale(out)
    if os.path.lexists(out) and not overwrite:
        raise CheckpointError(f"{os.path.abspath(out)} already exists: choose another --out or pass --overwrite")
    return path


def convert(src: str, out: str, overwrite: bool = False, with_tokenizer: bool = True, progress: bool = True) -> dict:
    """Converts ``src`` and writes ``out``; returns the checkpoint's meta dict.

    Raises:
      JaxindError: bad source, unwritable or occupied ``out`` (see :func:`preflight`), or
        ``out`` appeared while converting.
      converters.checkpoint.CheckpointInterrupted: Ctrl-C (the partial checkpoint is removed).
    """
    from converters import build, checkpoint, sources
    from jaxind.errors import CheckpointError

    start = time.perf_counter()
    path = preflight(src, out, overwrite)
    if checkpoint.is_checkpoint(path):
        raise CheckpointError(f"{src} is already a jaxind checkpoint: nothing to convert")
    if overwrite and os.path.lexists(out):
        checkpoint.check_replaceable(os.path.abspath(out))
    reader = sources.open_reader(path)
    meta = sources.source_meta(src, path, reader)

    tokenizer = source_tokenizer(src, reader, meta) if with_tokenizer else None  # before the slow part: fail early
    if not with_tokenizer:
        meta.update(tokenizer=None, tokenizer_missing="converted with --notokenizer")

    def write_tokenizer(directory: str) -> None:
        assert tokenizer is not None  # only passed on when there is one
        tokenizer.save_pretrained(directory)

    groups = build.iter_groups(reader, source=path, progress=progress)
    checkpoint.save_checkpoint(
        out,
        reader.config,
        groups,
        meta,
        overwrite=overwrite,
        write_tokenizer=write_tokenizer if tokenizer is not None else None,
    )
    logging.info("converted %s -> %s in %.1fs", src, out, time.perf_counter() - start)
    return meta


def source_tokenizer(src: str, reader: Any, meta: dict) -> Any:
    """The source's tokenizer, to be saved with the checkpoint; never dropped silently.

    A source without any tokenizer (an HF directory without tokenizer files, a GGUF file without
    ``tokenizer.ggml.*`` metadata) gets ``tokenizer: null`` and ``tokenizer_missing`` (the reason) in its meta and
    a warning. A source that has one that cannot be read is an error: the user asked for it (``--tokenizer``).

    Raises:
      CheckpointError: the source's tokenizer exists but cannot be read.
    """
    from jaxind.errors import CheckpointError, JaxindError
    from jaxind.io import tokenizer as tok

    if not reader.has_tokenizer():
        reason = f"the source {src} has no tokenizer"
        logging.warning("tokenizer not saved: %s (text data will need --data=random)", reason)
        meta.update(tokenizer=None, tokenizer_missing=reason)
        return None
    try:
        return tok.load_tokenizer(meta["tokenizer"])
    except JaxindError as e:
        raise CheckpointError(
            f"cannot save the tokenizer of {src}: {e}; pass --notokenizer to convert the weights without it"
        ) from None


def main(argv):
    del argv
    from jaxind.cli.cli_utils import run_reporting_errors
    from jaxind.errors import JaxindError

    def body() -> int:
        if not FLAGS.src or not FLAGS.out:
            raise JaxindError("--src and --out are required (see --help)")
        preflight(FLAGS.src, FLAGS.out, FLAGS.overwrite)  # before the heavy imports
        convert(
            FLAGS.src,
            FLAGS.out,
            overwrite=FLAGS.overwrite,
            with_tokenizer=FLAGS.tokenizer,
            progress=sys.stderr.isatty(),
        )
        print(f"wrote {FLAGS.out}")
        return 0

    run_reporting_errors(body)


def entry_point():
    from jaxind.cli.cli_utils import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry_point()
