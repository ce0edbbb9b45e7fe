"""Shared plumbing of the command-line entry points: one ``error:`` line for every problem a
user causes (bad flags included), one line and exit status 130 for Ctrl-C.

Imports nothing heavy: the CLIs parse and check their flags before JAX is loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags, logging

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def one_line(message: object) -> str:
    """``str(message)`` with its line breaks and runs of blanks collapsed to single spaces."""
    return " ".join(str(message).split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl ``flags_parser`` for ``app.run``: a bad flag value, an unknown flag, an unreadable
    flagfile or a positional argument (the CLIs take none) ends in one ``error:`` line and exit
    status 1 (absl's default prints usage text); ``--help`` prints the help and exits 0."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        message = one_line(e).removeprefix("ERROR:: ")
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(1)
    except SystemExit as e:  # absl's --help/--helpfull/--helpxml print the help, then exit 1: asking is no error
        sys.exit(0 if e.code == 1 else e.code)
    if len(rest) > 1:
        words = " ".join(repr(a) for a in rest[1:4]) + (" ..." if len(rest) > 4 else "")
        print(
            f"error: unexpected argument(s) {words}: every setting is a flag written --name=value (see --help)",
            file=sys.stderr,
        )
        sys.exit(1)
    return rest


def quiet_logging() -> None:
    """Hides library INFO chatter (orbax, jax) unless the user passed --verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_reporting_errors(body: Callable[[], int], interrupted: Callable[[], str] = lambda: "nothing written") -> None:
    """Runs ``body`` and exits with its status.

    A :class:`JaxindError` becomes one ``error: ...`` line on stderr and exit status 1. Ctrl-C
    becomes one ``interrupted; ...`` line and exit status 130: the text is the interrupt's own
    message if it carries one (e.g. ``partial checkpoint removed``), else ``interrupted()``.
    """
    from jaxind.errors import JaxindError

    quiet_logging()
    try:
        code = body()
    except JaxindError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:
        print(f"interrupted; {one_line(e) or interrupted()}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
