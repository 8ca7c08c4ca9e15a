"""The FastAPI application of ``kandinsky3 serve``: the APIs, the web UI, auth, limits and the job queue together.

    service = Service([Engine.load("tiny")], ServerConfig(queue_size=4))
    app = create_app(service)          # /sdapi/v1 (AUTOMATIC1111), /v1 (OpenAI Images), the web UI at /
    uvicorn.run(app, host="127.0.0.1", port=7860)

The queue starts with the app and stops with it: at shutdown waiting jobs end with a 503, the running job gets
``shutdown_grace`` seconds to finish and is then stopped at its next step (kandinsky3.serve.jobs). A request
waits for its job while polling its connection: a client that disconnects has its job dropped (or stopped).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, ImageRequest, ImageResult, Limits
from .errors import ApiError, a1111_body, openai_body
from ..errors import UsageError
from .jobs import JobCancelled, JobInterrupted, JobQueue, QueueFull, ShuttingDown

logger = logging.getLogger(__name__)

__all__ = ["GracefulServer", "ImageStore", "ServerConfig", "Service", "create_app", "wait_for_job"]

A1111_PREFIX, OPENAI_PREFIX = "/sdapi/", "/v1/"
PUBLIC_PREFIX = "/v1/images/files/"  # image URLs carry an unguessable token instead of the key


@dataclass(frozen=True)
class ServerConfig:
    """How the server behaves: its queue (``queue_size`` jobs may wait; ``timeout`` s from submission to the
    end of a job), ``api_key`` (None: no auth), the request limits, the largest request body, the seconds a
    running job gets at shutdown, how many generated images the ``url`` responses keep, and the web UI."""

    queue_size: int = 8
    timeout: float | None = 600.0
    api_key: str | None = None
    limits: Limits = Limits()
    max_body_bytes: int = 32 * 2**20
    shutdown_grace: float = 30.0
    stored_images: int = 256
    ui: bool = True


class ImageStore:
    """The last ``capacity`` images answered as URLs, in memory, each under a random token (never a file)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._images: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._images[token] = png
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)
        return token

    def get(self, token: str) -> bytes | None:
        with self._lock:
            return self._images.get(token)


@dataclass
class Service:
    """What the routes share: the engines (one per device, same model), the queue over them, the config, the
    image store, the settings clients posted to /sdapi/v1/options, and the start time."""

    engines: Sequence[Engine]
    config: ServerConfig = ServerConfig()
    queue: JobQueue = field(init=False)
    store: ImageStore = field(init=False)
    options: dict[str, Any] = field(default_factory=dict)
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        runners = {str(_device_of(engine)) + (f"#{i}" if i else ""): engine.run
                   for i, engine in enumerate(self.engines)}
        self.queue = JobQueue(runners, max_waiting=self.config.queue_size, timeout=self.config.timeout)
        self.store = ImageStore(self.config.stored_images)

    @property
    def engine(self) -> Engine:
        """The engine that answers questions about the model (all engines hold the same one)."""
        return self.engines[0]


def _device_of(engine: Engine):
    return next(engine.text_to_image.unet.parameters()).device


async def wait_for_job(request: Request, service: Service, image_request: ImageRequest) -> ImageResult:
    """Check ``image_request``, queue it, and wait for its result while the client stays connected and the
    queue's timeout has not passed; raises what the job raised (or UsageError, QueueFull, ShuttingDown before it
    is queued, JobCancelled when the client left or the time is up)."""
    prepared = await asyncio.to_thread(service.engine.prepare, image_request, service.config.limits)
    job = service.queue.submit(prepared)
    try:
        while not await job.wait(0.25):
            reason = "the client disconnected" if await request.is_disconnected() else \
                "timed out" if job.expired else None
            if reason is not None:  # the request ends now; a running job stops at its next step
                job.cancel(reason)
                logger.info("job %s cancelled: %s", job.id[:8], reason)
                if not job.done():
                    raise JobCancelled(reason)
    except asyncio.CancelledError:
        job.cancel("the request was cancelled")
        raise
    return job.result(timeout=5)


# --------------------------------------------------------------------------------------------------------------
# Security: the API key and the body size, as plain ASGI middleware (they run before any route reads the body)
# --------------------------------------------------------------------------------------------------------------


def _authorized(header: str | None, key: str, *, basic: bool) -> bool:
    """``Authorization: Bearer KEY``; with ``basic`` also Basic auth whose password (or "user:password") is KEY."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), key.encode())
    if basic and scheme.lower() == "basic":
        try:
            pair = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        password = pair.partition(":")[2]
        return hmac.compare_digest(password.encode(), key.encode()) or hmac.compare_digest(pair.encode(), key.encode())
    return False


class _Guard:
    """Refuse requests without the API key (Bearer on /v1; Bearer or Basic elsewhere, which lets a browser log
    in to the UI) and bodies over ``max_body_bytes`` (413), before the application sees them."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        key = self.config.api_key
        if key is not None and not path.startswith(PUBLIC_PREFIX):
            header = headers.get(b"authorization", b"").decode("latin-1")
            if not _authorized(header, key, basic=not path.startswith(OPENAI_PREFIX)):
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                error = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key",
                                 headers={"WWW-Authenticate": 'Bearer' if path.startswith(OPENAI_PREFIX)
                                          else 'Basic realm="kandinsky3"'})
                return await _error_response(path, error)(scope, receive, send)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        limit = self.config.max_body_bytes
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            error = ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
            return await _error_response(path, error)(scope, receive, send)
        await self.app(scope, _limited(receive, limit), send)


class _BodyTooLarge(Exception):
    pass


def _limited(receive, limit: int):
    """``receive`` that stops a body (chunked, without a length) once it passes ``limit`` bytes."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return wrapped


# --------------------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------------------


def _error_response(path: str, error: ApiError) -> JSONResponse:
    """``error`` in the shape of the API that ``path`` belongs to."""
    body = openai_body(error) if path.startswith(OPENAI_PREFIX) else a1111_body(error)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def _on_error(request: Request, error: Exception) -> JSONResponse:
    if isinstance(error, RequestValidationError):  # routes read their bodies themselves; kept for safety: no 422
        error = ApiError(400, f"invalid request: {error.errors()[:1]}", code="invalid_value")
    elif isinstance(error, StarletteHTTPException):
        error = ApiError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)
    elif isinstance(error, _BodyTooLarge):
        error = ApiError(413, "the request body is over the limit", code="body_too_large")
    return _error_response(request.url.path, ApiError.of(error))


def create_app(service: Service) -> FastAPI:
    """The application over ``service``: the routes of both APIs, the UI when gradio is installed and
    ``config.ui`` is set, errors as JSON, and the queue's lifetime bound to the application's."""
    from . import a1111, openai_api

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.queue.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.queue.shutdown, service.config.shutdown_grace)

    app = FastAPI(title="kandinsky3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    expected = (ApiError, UsageError, QueueFull, ShuttingDown, JobCancelled, JobInterrupted)
    for kind in (*expected, RequestValidationError, StarletteHTTPException, _BodyTooLarge, Exception):
        app.add_exception_handler(kind, _on_error)
    app.include_router(a1111.router)
    app.include_router(openai_api.router)
    if service.config.ui:
        _mount_ui(app, service)
    app.add_middleware(_Guard, config=service.config)
    return app


def _mount_ui(app: FastAPI, service: Service) -> None:
    try:
        from .ui import mount_ui, settings_for
    except ImportError as error:  # gradio is part of the `serve` extra; without it the APIs still serve
        logger.warning("web UI disabled: %s", error)
        return
    from .ui_backend import QueueBackend

    engine, limits = service.engine, service.config.limits
    settings = settings_for(engine.text_to_image, inpainting=engine.inpainting is not None,
                            loras=engine.loras.directory is not None, max_side=limits.max_side,
                            max_steps=limits.max_steps, max_batch=limits.max_images)
    mount_ui(app, QueueBackend(service), settings)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, which on the first SIGINT/SIGTERM also closes the job queue: waiting requests get their
    503 at once and the running job its grace time, so open requests end before uvicorn stops."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            grace = self.service.config.shutdown_grace
            threading.Thread(target=self.service.queue.shutdown, args=(grace,), daemon=True).start()
        super().handle_exit(sig, frame)
