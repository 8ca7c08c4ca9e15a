"""A bounded job queue with one worker thread per device: what the HTTP APIs and the web UI submit work to.

    queue = JobQueue({"cpu": run}, max_waiting=4, timeout=600)   # run(job) -> result, called in the worker thread
    queue.start()
    job = queue.submit(request)     # raises QueueFull (retry_after seconds) when max_waiting jobs already wait
    job.status                      # "queued", "running", "done", "failed" or "cancelled"
    job.progress                    # Progress(step, steps, fraction, eta_s): steps of the whole job, as reported
    result = job.result(timeout=5)  # blocks; raises the job's error (JobCancelled, JobInterrupted, UsageError, ...)
    ended = await job.wait(0.5)     # the same from asyncio: True once the job has ended (then call job.result())
    job.cancel("client left")       # a waiting job is dropped; a running one stops at its next step
    job.interrupt(); job.skip()     # AUTOMATIC1111's buttons: stop the job / stop only its current batch
    queue.state()                   # QueueState(waiting, running jobs, max_waiting, workers, closing)
    queue.position(job)             # jobs waiting ahead of it
    queue.shutdown(grace=30)        # refuse new jobs, drop waiting ones, give running ones ``grace`` s, then stop them

A job is one request (its ``request`` is whatever the submitter passed; the runner reads it). The runner function
of each worker, ``run(job) -> result``, reports progress with ``job.set_progress(step, steps)`` and calls
``job.checkpoint()`` between steps: it raises :class:`JobCancelled` (cancelled, timed out, shutting down),
:class:`JobInterrupted` (``interrupt()``) or :class:`SkipBatch` (``skip()``, once) there, so that a runner stops
within one step. What the runner returns is the job's result; what it raises is the job's error. Every submitted
job ends exactly once — done, failed or cancelled — and ``job.result()``/``job.wait()`` see that end.

Nothing here knows HTTP or torch: the server maps the errors to status codes (:mod:`kandinsky3.serve.errors`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Mapping

logger = logging.getLogger(__name__)

__all__ = [
    "Job", "JobCancelled", "JobInterrupted", "JobQueue", "Progress", "QueueFull", "QueueState", "ShuttingDown",
    "SkipBatch",
]


class QueueFull(Exception):
    """``max_waiting`` jobs already wait; try again in ``retry_after`` seconds (an estimate, at least 1)."""

    def __init__(self, max_waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({max_waiting} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The queue no longer takes or runs jobs: the server is stopping."""


class JobCancelled(Exception):
    """The job was cancelled before it finished; ``reason`` says by whom ("timed out", "client disconnected"...)."""

    def __init__(self, reason: str):
        super().__init__(f"the job was cancelled: {reason}")
        self.reason = reason


class JobInterrupted(Exception):
    """``interrupt()`` stopped the job before any of its images was finished."""

    def __init__(self):
        super().__init__("the job was interrupted before it finished an image")


class SkipBatch(Exception):
    """Raised once by :meth:`Job.checkpoint` after ``skip()``: the runner drops its current batch and goes on."""


@dataclass(frozen=True)
class Progress:
    """How far a job is: ``step`` of ``steps`` sampler steps (0 of 0 until its runner says), their ratio, and the
    estimated seconds left (None until a step has run)."""

    step: int
    steps: int
    fraction: float
    eta_s: float | None


class Job:
    """One submitted request and its life: queued → running → done, failed or cancelled.

    Read ``id``, ``request``, ``status``, ``progress``, ``worker`` (the device running it), ``submitted``,
    ``started`` and ``finished`` (``time.monotonic()`` values or None). Control it with :meth:`cancel`,
    :meth:`interrupt` and :meth:`skip`; get its outcome with :meth:`result` or ``await`` :meth:`wait`.
    """

    def __init__(self, request: Any, deadline: float | None):
        self.id = uuid.uuid4().hex
        self.request = request
        self.deadline = deadline
        self.status = "queued"
        self.worker: str | None = None
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self._step, self._steps = 0, 0
        self._stop: BaseException | None = None  # what checkpoint() raises next
        self._skip = False
        self._future: Future = Future()
        self._on_cancel: Callable[[Job], None] | None = None  # the queue's hook: drop a waiting job

    # ----------------------------------------------------------------------------- for the submitter

    @property
    def progress(self) -> Progress:
        step, steps = self._step, self._steps
        fraction = 1.0 if self.status == "done" else (step / steps if steps else 0.0)
        eta = None
        if self.started is not None and step and self.finished is None:
            elapsed = time.monotonic() - self.started
            eta = elapsed / step * (steps - step)
        return Progress(step, steps, fraction, eta)

    def done(self) -> bool:
        return self._future.done()

    @property
    def expired(self) -> bool:
        """Whether the queue's timeout has passed for this job."""
        return self.deadline is not None and time.monotonic() > self.deadline

    def result(self, timeout: float | None = None) -> Any:
        """The runner's result; raises the job's error, or TimeoutError when it has not ended within ``timeout``."""
        return self._future.result(timeout)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds without blocking the event loop; True once the job has ended."""
        if self._future.done():
            return True
        waiter = asyncio.wrap_future(self._future)
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # its error is read via result()
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
        return bool(done)

    def cancel(self, reason: str = "cancelled") -> None:
        """Drop the job if it waits; stop it at its next step if it runs; nothing once it has ended."""
        if self.done():
            return
        self._stop = JobCancelled(reason)
        if self._on_cancel is not None:
            self._on_cancel(self)

    def interrupt(self) -> None:
        """Stop at the next step; the runner returns what it has finished (AUTOMATIC1111's Interrupt)."""
        if not self.done() and self._stop is None:
            self._stop = JobInterrupted()

    def skip(self) -> None:
        """Drop the batch being sampled and go on with the next (AUTOMATIC1111's Skip)."""
        if self.status == "running":
            self._skip = True

    # ----------------------------------------------------------------------------- for the runner

    def set_progress(self, step: int, steps: int) -> None:
        self._step, self._steps = step, steps

    def checkpoint(self) -> None:
        """Raise what stops the job here (cancel, timeout, interrupt, skip); a runner calls it between steps."""
        if self._stop is None and self.expired:
            self._stop = JobCancelled("timed out")
        if self._stop is not None:
            raise self._stop
        if self._skip:
            self._skip = False
            raise SkipBatch()

    @property
    def interrupted(self) -> bool:
        return isinstance(self._stop, JobInterrupted)

    # ----------------------------------------------------------------------------- for the queue

    def _end(self, status: str, result: Any = None, error: BaseException | None = None) -> None:
        if self._future.done():
            return
        self.status, self.finished = status, time.monotonic()
        if error is None:
            self._future.set_result(result)
        else:
            self._future.set_exception(error)

    def __repr__(self) -> str:
        return f"Job({self.id[:8]}, {self.status}, step {self._step}/{self._steps})"


@dataclass(frozen=True)
class QueueState:
    """A snapshot: jobs waiting, the running jobs (oldest first), the bound, the worker names, whether closing."""

    waiting: int
    running: tuple[Job, ...]
    max_waiting: int
    workers: tuple[str, ...]
    closing: bool

    @property
    def job_count(self) -> int:
        return self.waiting + len(self.running)


class JobQueue:
    """Jobs wait in one FIFO of at most ``max_waiting``; one thread per entry of ``runners`` ({worker name: run})
    takes the oldest and runs it. ``timeout``: seconds from submission after which a job is cancelled (None:
    never)."""

    def __init__(self, runners: Mapping[str, Callable[[Job], Any]], *, max_waiting: int, timeout: float | None = None):
        if not runners:
            raise ValueError("a JobQueue needs at least one runner")
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.runners = dict(runners)
        self.max_waiting = max_waiting
        self.timeout = timeout
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[str, Job] = {}
        self._lock = threading.Condition()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._durations: collections.deque[float] = collections.deque(maxlen=20)  # for Retry-After

    def start(self) -> None:
        for name, run in self.runners.items():
            thread = threading.Thread(target=self._work, args=(name, run), name=f"kandinsky3-worker-{name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, request: Any) -> Job:
        """Queue ``request`` as a new job; QueueFull when ``max_waiting`` jobs wait, ShuttingDown when closing."""
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            self._drop_expired()
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(self.max_waiting, self._retry_after())
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            job = Job(request, deadline)
            job._on_cancel = self._cancel_waiting
            self._waiting.append(job)
            self._lock.notify()
        return job

    def state(self) -> QueueState:
        with self._lock:
            self._drop_expired()
            running = tuple(sorted(self._running.values(), key=lambda job: job.started or 0.0))
            return QueueState(len(self._waiting), running, self.max_waiting, tuple(self.runners), self._closing)

    def position(self, job: Job) -> int:
        """How many jobs wait ahead of ``job`` (0 once it runs or has ended)."""
        with self._lock:
            return next((i for i, waiting in enumerate(self._waiting) if waiting is job), 0)

    def shutdown(self, grace: float = 30.0) -> None:
        """Refuse new jobs and end the waiting ones with ShuttingDown; let running jobs finish for ``grace``
        seconds, then cancel them (each stops at its next step). Idempotent."""
        with self._lock:
            self._closing = True
            while self._waiting:
                self._waiting.popleft()._end("cancelled", error=ShuttingDown("the server is shutting down"))
            self._lock.notify_all()
        end = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        with self._lock:
            running = list(self._running.values())
        for job in running:
            job.cancel("the server is shutting down")
        for thread in self._threads:
            thread.join(5.0)

    # ----------------------------------------------------------------------------- inside

    def _retry_after(self) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        ahead = len(self._waiting) + len(self._running)
        return max(1, math.ceil(mean * ahead / len(self.runners)))

    def _cancel_waiting(self, job: Job) -> None:
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job._end("cancelled", error=job._stop)

    def _drop_expired(self) -> None:
        for job in [job for job in self._waiting if job.expired]:
            self._waiting.remove(job)
            job._end("cancelled", error=JobCancelled("timed out while waiting in the queue"))

    def _next(self, name: str) -> Job | None:
        """The oldest waiting job, now running on ``name``; None when the queue closes."""
        with self._lock:
            while True:
                self._drop_expired()
                if self._closing:
                    return None
                if self._waiting:
                    job = self._waiting.popleft()
                    job.status, job.worker, job.started = "running", name, time.monotonic()
                    self._running[name] = job
                    return job
                self._lock.wait(timeout=1.0)

    def _work(self, name: str, run: Callable[[Job], Any]) -> None:
        while (job := self._next(name)) is not None:
            try:
                result = run(job)
            except (JobCancelled, ShuttingDown) as error:
                job._end("cancelled", error=error)
            except Exception as error:  # the job's error: the submitter decides how to report it
                if not isinstance(error, (JobInterrupted, ValueError)):
                    logger.exception("job %s failed", job.id)
                job._end("failed", error=error)
            else:
                job._end("done", result)
            with self._lock:
                del self._running[name]
                self._durations.append(job.finished - job.started)
