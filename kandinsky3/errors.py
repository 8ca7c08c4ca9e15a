"""The library's one exception for bad input: a value, option or file the caller gave cannot be used.

Every check of what a user passed raises :class:`UsageError` (a ValueError, so ``except ValueError`` still works)
with a message that names the offending value and says what would be accepted; checkpoint problems raise
:class:`kandinsky3.weights.CheckpointError`. The ``kandinsky3`` command prints these as one line and exits with
status 2; any other exception is a bug and keeps its traceback.

Checks that live in general-purpose modules (the sampler table, the schedule) raise plain ValueErrors; a caller
that runs them on a user's input does so inside :func:`validating`, which reports their ValueErrors as
UsageErrors.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["UsageError", "validating"]


class UsageError(ValueError):
    """A value the caller passed is not acceptable; the message names it and the accepted values."""


@contextlib.contextmanager
def validating() -> Iterator[None]:
    """A block that checks what a caller passed: a ValueError raised in it is the caller's mistake and leaves as a
    UsageError with the same message (the original chained as its cause)."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(str(error)) from error
