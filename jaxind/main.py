"""``python -m jaxind.main``: the command line, kept at this path for every script and launcher that
runs it. The code is :mod:`jaxind.cli.main`; importing names from here still works for one release,
with a ``DeprecationWarning`` (see :mod:`jaxind._compat`)."""

from typing import Any

from jaxind import _compat


def __getattr__(name: str) -> Any:
    return _compat.forward("jaxind.main", "jaxind.cli.main", name)


if __name__ == "__main__":
    from absl import flags

    from jaxind.cli import main as command

    __doc__ = command.__doc__  # what --help prints: the command's usage, and its flags as this module's own
    flags.adopt_module_key_flags(command)
    command.entry_point()
