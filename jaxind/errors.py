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
