"""Time to tokens for ``--data=text:PATH``: the windowed reader (``jaxind.io.token_source.make_tokens``: seeded byte
offsets, only the windows' bytes read and tokenised) against the old reader (tokenise the whole file, then
cut windows from the token stream), on a 1 MB and a 100 MB file, in one run.

Text: Python's standard-library sources (real English comments and docstrings among code), repeated to
size. Tokenizer: SmolLM2's (the real GGUF's byte-level BPE, 49,152 ids). Windows: 64 x 128 tokens.
The old reader runs on the 1 MB and 10 MB files (and 100 MB with --old_100mb; minutes): it is linear in
the file. Seconds are the median of --repeats runs; the page cache is warm after the first.

    python benchmarks/bench_tokens.py --output benchmarks/results/tokens_cpu.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxind.io import token_source, tokenizer  # noqa: E402
from jaxind.io.assets import smollm2_gguf  # noqa: E402

MB = 1 << 20


def corpus(size: int) -> bytes:
    """``size`` bytes of the standard library's sources, repeated."""
    base = b"".join(open(p, "rb").read() for p in sorted(glob.glob(os.path.join(sysconfig.get_path("stdlib"), "*.py"))))
    base = base.decode("utf-8", "ignore").encode()
    return (base * (size // len(base) + 1))[:size].decode("utf-8", "ignore").encode()


def old_reader(path: str, spec: token_source.DataSpec, tok) -> np.ndarray:
    """The reader before windows: the whole file tokenised, then windows of the token stream."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = np.asarray(tokenizer.encode(tok, [text])[0], np.int64)
    return token_source.windows(ids, spec)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old_100mb", action="store_true", help="also time the old reader on 100 MB")
    args = parser.parse_args(argv)
    tok = tokenizer.gguf_tokenizer(smollm2_gguf())
    vocab = 49152
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size_mb in (1, 10, 100):
            path = os.path.join(folder, f"{size_mb}mb.txt")
            with open(path, "wb") as f:
                f.write(corpus(size_mb * MB))
            spec = token_source.DataSpec("text", path, num_sequences=64, seq_len=128, seed=0)
            new = timed(lambda spec=spec: token_source.make_tokens(spec, vocab, vocab, tok), args.repeats)
            row = {"file_mb": size_mb, "windowed_s": new, "old_s": None}
            if size_mb < 100 or args.old_100mb:
                row["old_s"] = timed(lambda path=path, spec=spec: old_reader(path, spec, tok), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "time to tokens, --data=text:PATH, 64 windows of 128 tokens, SmolLM2 tokenizer",
        "machine": platform.platform(),
        "rows": rows,
        "windowed_100mb_over_1mb": rows[2]["windowed_s"] / rows[0]["windowed_s"],
        "old_10mb_over_1mb": rows[1]["old_s"] / rows[0]["old_s"],
        "old_over_windowed_1mb": rows[0]["old_s"] / rows[0]["windowed_s"],
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return result


if __name__ == "__main__":
    main()
