"""The command lines: `python -m jaxind.main` (:mod:`jaxind.cli.main`), `python -m jaxind.sweep`
(:mod:`jaxind.cli.sweep`), the demo and the shared plumbing (docs/DESIGN.md §2)."""
