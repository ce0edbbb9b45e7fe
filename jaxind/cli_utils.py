"""Shared plumbing of the command-line entry points."""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags, logging


def quiet_logging() -> None:
    """Hides library INFO chatter (orbax, jax) unless the user passed --verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_reporting_errors(body: Callable[[], int]) -> None:
    """Runs ``body``; a :class:`JaxindError` becomes one ``error: ...`` line on stderr and exit 1."""
    from jaxind.errors import JaxindError

    quiet_logging()
    try:
        code = body()
    except JaxindError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
