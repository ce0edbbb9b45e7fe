"""``python -m jaxind.sweep``: the sweep's command line, kept at this path for every script and
launcher that runs it. The command line is :mod:`jaxind.cli.sweep`, the work :mod:`jaxind.many.sweep`;
importing names from here still works for one release, with a ``DeprecationWarning`` (see
:mod:`jaxind._compat`)."""

from typing import Any

from jaxind import _compat


def __getattr__(name: str) -> Any:
    target = "jaxind.cli.sweep" if name in _compat.SWEEP_CLI_NAMES else "jaxind.many.sweep"
    return _compat.forward("jaxind.sweep", target, name)


if __name__ == "__main__":
    from absl import flags

    from jaxind.cli import sweep as command

    __doc__ = command.__doc__  # what --help prints: the command's usage, and its flags as this module's own
    flags.adopt_module_key_flags(command)
    command.entry_point()
