"""Named points where a test can freeze a CLI process, to interrupt or kill it there.

With ``JAXIND_TEST_STOP_AT=<name>`` in the environment, :func:`stop_at` prints
``stopped at <name>`` on stderr and stops the process with SIGSTOP when it reaches that point;
the test then sends SIGKILL, or SIGINT followed by SIGCONT, or just SIGCONT. Unset (always, outside
tests), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "JAXIND_TEST_STOP_AT"


def stop_at(name: str) -> None:
    """Stops this process if the test asked for point ``name`` (see the module docstring)."""
    if os.environ.get(ENV) == name:
        print(f"stopped at {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
