"""The web UI's view of the server (:class:`kandinsky3.serve.ui.UIBackend`): its form requests become jobs of the
same bounded queue the APIs use, so the page and the API clients wait in one line."""

from __future__ import annotations

from ..errors import UsageError
from .app import Service
from .engine import ImageRequest
from .errors import ApiError
from .jobs import Job, QueueFull, ShuttingDown
from .ui import JobStatus, UIRequest

__all__ = ["QueueBackend"]

_TASKS = {"txt2img": "text-to-image", "img2img": "img2img", "inpaint": "inpainting"}


class QueueBackend:
    """submit → the job itself as the handle; poll → :class:`JobStatus`; cancel → the job is dropped or
    stopped; loras → the names of the engine's LoRA folder (scanned again on ``refresh``)."""

    def __init__(self, service: Service):
        self.service = service

    def submit(self, request: UIRequest) -> Job:
        """Queue the page's request; a refusal (bad input, full queue, shutdown) is a UsageError to show."""
        sized = request.mode != "inpaint"  # img2img resizes its input to the form's size, as AUTOMATIC1111 does
        image_request = ImageRequest(
            _TASKS[request.mode], request.prompt, request.negative_prompt or None,
            width=request.width if sized else None, height=request.height if sized else None,
            steps=request.steps, guidance_scale=request.guidance_scale, sampler=request.sampler,
            seed=None if request.seed < 0 else request.seed, batch_size=request.batch, image=request.image,
            mask=request.mask, strength=request.strength,
        )
        try:
            return self.service.queue.submit(self.service.engine.prepare(image_request, self.service.config.limits))
        except (QueueFull, ShuttingDown) as error:
            raise UsageError(str(error)) from None

    def poll(self, job: Job) -> JobStatus:
        progress = job.progress
        if job.status == "queued":
            return JobStatus("queued", position=self.service.queue.position(job))
        if job.status == "running":
            return JobStatus("running", step=progress.step, steps=progress.steps)
        try:
            result = job.result(timeout=0)
        except Exception as error:  # the job's end, told in one line
            return JobStatus("cancelled" if job.status == "cancelled" else "failed", progress.step, progress.steps,
                             message=ApiError.of(error).message)
        return JobStatus("done", progress.step, progress.steps, images=tuple(result.images),
                         seeds=tuple(result.seeds))

    def cancel(self, job: Job) -> None:
        job.cancel("cancelled from the web UI")

    def loras(self, refresh: bool = False) -> list[str]:
        library = self.service.engine.loras
        if refresh:
            library.refresh()
        return [entry.name for entry in library.entries()]
