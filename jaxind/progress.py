"""Progress bars on stderr, shown only when stderr is a terminal (quiet in logs, CI and tests)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), disabled off a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=not sys.stderr.isatty())
