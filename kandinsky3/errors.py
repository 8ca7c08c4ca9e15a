"""The library's one exception for bad input: a value, option or file the caller gave cannot be used.

Every check of what a user passed raises :class:`UsageError` (a ValueError, so ``except ValueError`` still works)
with a message that names the offending value and says what would be accepted; checkpoint problems raise
:class:`kandinsky3.weights.CheckpointError`. The ``kandinsky3`` command prints these as one line and exits with
status 2; any other exception is a bug and keeps its traceback.

A value of the wrong type raises :class:`UsageTypeError`, which is both a UsageError and a TypeError. Sampling that
produces NaN or infinity (half-precision overflow) stops with :class:`NonFiniteError`, naming the step.

Checks that live in general-purpose modules (the sampler table, the schedule) raise plain ValueErrors; a caller
that runs them on a user's input does so inside :func:`validating`, which reports their ValueErrors as
UsageErrors.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["NonFiniteError", "UsageError", "UsageTypeError", "validating"]


class UsageError(ValueError):
    """A value the caller passed is not acceptable; the message names it and the accepted values."""


class UsageTypeError(UsageError, TypeError):
    """A value the caller passed has the wrong type (``prompt=123``); ``except TypeError`` catches it too."""


class NonFiniteError(RuntimeError):
    """Sampling or decoding produced NaN or infinity (typically float16 overflow); the message names the step and
    says what to change (compute in fp32 or bf16)."""


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
