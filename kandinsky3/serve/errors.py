"""Errors as HTTP answers: one status per kind of failure, in the body shape each API's clients expect.

    ApiError.of(error)        # any exception → ApiError(status, message, headers): UsageError 400, QueueFull 429
    a1111_body(api_error)     # {"error": "Bad Request", "detail": "..."}          (/sdapi/v1)
    openai_body(api_error)    # {"error": {"message", "type", "param", "code"}}    (/v1)

A request never sees a traceback: an unexpected exception is logged with its traceback and answered with a 500
whose message only says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ..errors import UsageError
from .jobs import JobCancelled, JobInterrupted, QueueFull, ShuttingDown

logger = logging.getLogger(__name__)

__all__ = ["ApiError", "a1111_body", "openai_body"]

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 413: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class ApiError(Exception):
    """An answer that is not images: ``status``, a one-line ``message``, the request field at fault (``param``),
    a machine-readable ``code`` and extra response headers (Retry-After)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, error: BaseException) -> ApiError:
        """The answer for ``error`` raised while handling a request or running its job."""
        if isinstance(error, ApiError):
            return error
        if isinstance(error, UsageError):
            return cls(400, str(error), code="invalid_value")
        if isinstance(error, QueueFull):
            return cls(429, str(error), code="queue_full", headers={"Retry-After": str(error.retry_after)})
        if isinstance(error, ShuttingDown):
            return cls(503, str(error), code="shutting_down")
        if isinstance(error, JobCancelled):
            timed_out = "timed out" in error.reason
            return cls(504 if timed_out else 409, str(error), code="timeout" if timed_out else "cancelled")
        if isinstance(error, JobInterrupted):
            return cls(409, str(error), code="interrupted")
        logger.error("internal error", exc_info=(type(error), error, error.__traceback__))
        return cls(500, "internal server error; the server log has the details", code="internal_error")


def a1111_body(error: ApiError) -> dict[str, Any]:
    """AUTOMATIC1111's error shape: the status phrase as ``error``, the reason as ``detail``."""
    return {"error": HTTPStatus(error.status).phrase, "detail": error.message}


def openai_body(error: ApiError) -> dict[str, Any]:
    """The OpenAI API's error shape."""
    kind = _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
