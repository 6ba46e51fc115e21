"""The one error type users see: a failure they can act on, printed without a traceback.

Everything that is the user's to fix (bad params, bad data, failed validation, a missing key, a 4xx from a
service) raises :class:`StageError` or a subclass; entry points (``touchvl`` and ``python -m tasks.<stage>``)
print its message and exit non-zero.  Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class StageError(RuntimeError):
    """A failure the user can act on (bad params, bad data, failed validation): printed, no traceback."""
