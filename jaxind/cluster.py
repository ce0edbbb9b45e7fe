"""Multi-host runs (docs/DESIGN.md §5.12): ``jax.distributed`` from the flags or from the environment, the
``--mesh`` text, and which process writes.

Every process runs the same command (the same flagfile; only ``--process_id`` differs where it is given by
hand): it computes the same tokens, takes its share of every batch (the rows of its own devices), runs the same
jitted programs, gets the same statistics back on its host, and only process 0 writes the results and pictures.
"""

from __future__ import annotations

import os

from jaxind.errors import JaxindError

MESH_AXES = ("data", "fsdp", "model")

# Environments in which jax.distributed.initialize() finds the coordinator, process count and id by itself
# (JAXIND_DISTRIBUTED=1 asks for it in any environment JAX supports, e.g. from a launcher).
_DETECTED = {
    "JAXIND_DISTRIBUTED=1": lambda env: env.get("JAXIND_DISTRIBUTED") == "1",
    "SLURM": lambda env: int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env,
    "Open MPI": lambda env: int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1,
    "TPU pod": lambda env: len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1,
}


def detected_cluster(env: dict[str, str] | None = None) -> str | None:
    """The multi-process environment JAX can initialise from (SLURM with several tasks, Open MPI, a multi-host
    TPU slice, or any other when ``JAXIND_DISTRIBUTED=1``), or None."""
    env = dict(os.environ if env is None else env)
    return next((name for name, test in _DETECTED.items() if test(env)), None)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data:2,fsdp:-1,model:2"`` -> ``{"data": 2, "fsdp": -1, "model": 2}`` (-1: the devices left); cheap, so
    the CLI checks ``--mesh`` before JAX starts.

    Raises:
      JaxindError: malformed text, an unknown axis, or more than one -1.
    """
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition(":")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if name not in MESH_AXES or name in sizes or (size < 1 and size != -1):
            raise JaxindError(
                f"--mesh={text!r}: expected axis:size pairs over {', '.join(MESH_AXES)} (each once, size >= 1 or "
                "-1 for the devices left), e.g. --mesh=fsdp:-1 or --mesh=data:2,fsdp:2,model:2"
            )
        sizes[name] = size
    if not sizes:
        raise JaxindError(f"--mesh={text!r} names no axis: e.g. --mesh=fsdp:-1")
    if list(sizes.values()).count(-1) > 1:
        raise JaxindError(f"--mesh={text!r}: at most one axis may be -1")
    return sizes


def check_flags(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Refuses a partial set of the distributed flags (before anything is loaded).

    Raises:
      JaxindError: some but not all of the three are given, or the process id is out of range.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise JaxindError(
            "pass --coordinator_address, --num_processes and --process_id together (or none of them, where JAX "
            "finds them in the environment: SLURM, Open MPI, TPU pods)"
        )
    if all(given) and not 0 <= process_id < num_processes:  # type: ignore[operator]
        raise JaxindError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts ``jax.distributed`` from the flags, or from the environment where :func:`detected_cluster` finds
    one; does nothing for a single process. Must run before any JAX computation. Returns whether it started."""
    import jax

    check_flags(coordinator_address, num_processes, process_id)
    if coordinator_address is not None:
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if detected_cluster() is not None:
        jax.distributed.initialize()
        return True
    return False


def process_index() -> int:
    """This process's index (0 for a single process)."""
    import jax

    return jax.process_index()


def is_writer() -> bool:
    """Whether this process writes results and pictures (process 0)."""
    return process_index() == 0


def check_layer_shards(layer_shards: int) -> None:
    """Refuses a PERMTEST layer split that does not divide the device count (before any model is loaded).

    Raises:
      JaxindError: ``layer_shards`` does not divide the number of devices.
    """
    import jax

    if jax.device_count() % layer_shards:
        raise JaxindError(
            f"--permtest_layer_shards={layer_shards} must divide the {jax.device_count()} devices PERMTEST runs on"
        )
