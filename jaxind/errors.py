"""User-facing errors.

Every problem a user can cause (wrong path, unsupported architecture, shape mismatch,
NaN weights, corrupt file) is raised as :class:`JaxindError` with a message that names the
problem and the fix. The CLIs print that message on one line and exit non-zero instead of
showing a traceback from deep inside JAX.
"""

from __future__ import annotations


class JaxindError(Exception):
    """A problem with the user's input, explained in one line."""


class UnsupportedModelError(JaxindError):
    """The checkpoint's architecture or config attributes are not handled."""


class CheckpointError(JaxindError):
    """A checkpoint is missing, unreadable, corrupt, or disagrees with its config."""


def brief(error: BaseException, limit: int = 160) -> str:
    """``"Type: message"`` of a library exception on one line, shortened at a word boundary to
    about ``limit`` characters (for quoting inside a one-line :class:`JaxindError`)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip(" ,;:") + " ..."
