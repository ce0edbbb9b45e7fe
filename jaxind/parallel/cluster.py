"""Multi-host runs (docs/DESIGN.md §5.12): ``jax.distributed`` from the flags or from the environment, the
``--mesh`` text, and which process writes.

Every process runs the same command (the same flagfile; only ``--process_id`` differs where it is given by
hand): it computes the same tokens, takes its share of every batch (the rows of its own devices), runs the same
jitted programs, gets the same statistics back on its host, and only process 0 writes the results and pictures.
"""

from __future__ import annotations

import os
import time

from jaxind.errors import JaxindError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MESH_AXES",
    "check_flags",
    "check_layer_shards",
    "detected_cluster",
    "initialize",
    "is_writer",
    "parse_mesh",
    "process_index",
]

MESH_AXES = ("data", "fsdp", "model")
DEFAULT_TIMEOUT_S = 300  # --distributed_timeout: how long a multi-process start may wait for every process
_JAX_MIN_S = 30  # the least time left to jax.distributed's own connection after the rendezvous

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
    """Refuses a partial set of the distributed flags, and a coordinator address that is not HOST:PORT or
    whose host does not resolve (before anything is loaded).

    Raises:
      JaxindError: some but not all of the three are given, the process id is out of range, or the address
      is malformed or unresolvable.
    """
    from jaxind.parallel import rendezvous

    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise JaxindError(
            "pass --coordinator_address, --num_processes and --process_id together (or none of them, where JAX "
            "finds them in the environment: SLURM, Open MPI, TPU pods)"
        )
    if all(given) and not 0 <= process_id < num_processes:  # type: ignore[operator]
        raise JaxindError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
    if coordinator_address is not None:
        rendezvous.check_address(coordinator_address)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> bool:
    """Starts ``jax.distributed`` from the flags, or from the environment where :func:`detected_cluster` finds
    one; does nothing for a single process. Must run before any JAX computation. Returns whether it started.

    Bounded: from the flags, the processes first meet in :mod:`jaxind.parallel.rendezvous` (process 0 names the missing
    ones every 10 s); the start, and JAX's own connection after it, end within ``timeout`` seconds (at least
    30 s for JAX's part) with one ``error:`` line and exit 1, never JAX's C++ abort.

    Raises:
      JaxindError: bad flags, or a process missing after ``timeout`` seconds (before JAX's part).
    """
    from jaxind.parallel import rendezvous

    check_flags(coordinator_address, num_processes, process_id)
    if coordinator_address is not None:
        if num_processes == 1:
            return False
        assert num_processes is not None and process_id is not None
        start = time.monotonic()
        if process_id == 0:
            rendezvous.host(coordinator_address, num_processes, timeout)
        else:
            rendezvous.join(coordinator_address, num_processes, process_id, timeout)
        left = max(timeout - (time.monotonic() - start), _JAX_MIN_S)
        _start_jax(
            left,
            f"process {process_id}: every process is here; connecting to JAX's coordination service at "
            f"{coordinator_address}",
            f"process {process_id}: JAX's coordination service at {coordinator_address} did not start within "
            f"{left:.0f}s although every process had met: a process failed while connecting (see its log)",
            coordinator_address,
            num_processes,
            process_id,
        )
        return True
    name = detected_cluster()
    if name is not None:
        _start_jax(
            timeout,
            f"waiting for the other processes of this {name} job (JAX does not say which ones are missing)",
            f"the processes of this {name} job did not all start within --distributed_timeout={timeout:.0f}s: "
            "check that every task runs the same command, or raise --distributed_timeout",
        )
        return True
    return False


def _start_jax(
    timeout: float,
    waiting: str,
    failed: str,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` (from these arguments, or the environment where they are None) under a
    watchdog that ends the process with the line ``failed`` after ``timeout`` seconds, before JAX's own timeout
    (30 s later) would abort it from C++."""
    import jax

    from jaxind.parallel import rendezvous

    def start() -> None:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, initialization_timeout=int(timeout) + _JAX_MIN_S
        )

    rendezvous.bounded(start, timeout, waiting, failed)


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

    if layer_shards and jax.device_count() % layer_shards:
        raise JaxindError(
            f"--permtest_layer_shards={layer_shards} must divide the {jax.device_count()} devices PERMTEST runs on"
        )
