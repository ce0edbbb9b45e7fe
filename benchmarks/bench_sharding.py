"""Per-device parameter bytes with the params sharded over 1, 2, 4 and 8 devices.

Measured: a SmolLM2-135M-sized random Llama (float32) placed with ``Layout.place`` on ``fsdp`` meshes of 1, 2, 4
and 8 fake CPU devices (``--xla_force_host_platform_device_count=8``, set here); the bytes of each device's
addressable shards are summed, and compared with :func:`jaxind.parallel.sharding.param_bytes_per_device` (the
rules applied
to an abstract mesh). Planned: the same function for Llama-2-7B and Llama-2-70B (float32, one model; a pair is
twice that) on 1/2/4/8-way ``fsdp`` and on the meshes of ``configs/``.

    python benchmarks/bench_sharding.py --output benchmarks/results/sharding_bytes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxind.models import model  # noqa: E402
from jaxind.models.config import ModelConfig  # noqa: E402
from jaxind.parallel import sharding  # noqa: E402

SMOLLM2 = ModelConfig("llama", 49152, 576, 30, 9, 3, 64, 1536, rope_theta=100000.0, tie_embeddings=True)
LLAMA2_7B = ModelConfig("llama", 32000, 4096, 32, 32, 32, 128, 11008)
LLAMA2_70B = ModelConfig("llama", 32000, 8192, 80, 64, 8, 128, 28672)
GIB = 2**30


def measured() -> list[dict]:
    params = jax.jit(lambda k: model.init_params(SMOLLM2, k))(jax.random.key(0))
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    rows = []
    for n in (1, 2, 4, 8):
        layout = sharding.Layout(sharding.make_mesh({"fsdp": n}, jax.devices()[:n]))
        placed = layout.place(params, SMOLLM2)
        per_device = sharding.bytes_per_device(placed)
        rows.append(
            {
                "devices": n,
                "mesh": {"fsdp": n},
                "model_bytes": total,
                "max_bytes_per_device": max(per_device.values()),
                "min_bytes_per_device": min(per_device.values()),
                "predicted_bytes_per_device": sharding.param_bytes_per_device(SMOLLM2, {"fsdp": n}),
                "fraction_of_model": max(per_device.values()) / total,
            }
        )
        del placed
    return rows


def planned() -> list[dict]:
    meshes = [{"fsdp": n} for n in (1, 2, 4, 8)] + [{"fsdp": 64}, {"fsdp": 16, "model": 4}]
    return [
        {
            "model": name,
            "params": cfg.num_params(),
            "mesh": mesh,
            "gib_per_device_float32": sharding.param_bytes_per_device(cfg, mesh) / GIB,
            "gib_per_device_bfloat16": sharding.param_bytes_per_device(cfg, mesh, 2) / GIB,
        }
        for name, cfg in (("llama2_7b", LLAMA2_7B), ("llama2_70b", LLAMA2_70B))
        for mesh in meshes
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON path for the results")
    args = parser.parse_args(argv)
    result = {
        "benchmark": "param_bytes_per_device",
        "measured": measured(),
        "planned": planned(),
        "jax": jax.__version__,
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.output + ".tmp", args.output)
    return result


if __name__ == "__main__":
    main()
