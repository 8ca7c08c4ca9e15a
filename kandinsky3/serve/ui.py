"""The web UI of ``kandinsky3 serve``: a Gradio page at "/" for text-to-image, img2img and inpainting.

The page talks to the server's job queue through :class:`UIBackend`: ``submit`` a :class:`UIRequest`, ``poll``
its :class:`JobStatus` (the sampler callback's step, then the images), ``cancel`` it, and list the ``loras`` a
prompt may name (the LoRA picker, shown when the server has ``--lora-dir``, writes their ``<lora:name:weight>``
tags into the prompt). While a job runs, the generate handler polls it a few times a second and redraws the
progress bar; the Cancel button cancels the job of the browser session that pressed it. Gradio's own queue lets
every event through (``concurrency_limit=None``), so the server's bounded queue is the only one a request waits in.

    blocks = build_ui(backend, settings)   # a gr.Blocks; settings_for(pipeline) reads the model's defaults
    app = mount_ui(app, backend, settings) # the page at "/" of a FastAPI app, after its API routes

Image conventions: the inpainting editor's painted pixels (any layer, alpha > 0; the brush is white) are the area
to repaint, passed on as an (H, W) float32 mask with 1 = repaint at the uploaded image's size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Literal, Protocol, Sequence

import gradio as gr
import numpy as np
from PIL import Image

from ..diffusion.registry import get_sampler, sampler_names
from ..lora import with_prompt_lora
from ..pipelines.checks import size_multiple

if TYPE_CHECKING:
    import fastapi

logger = logging.getLogger(__name__)

__all__ = ["JobStatus", "UIBackend", "UIRequest", "UISettings", "build_ui", "inpainting_mask", "mount_ui",
           "settings_for"]

Mode = Literal["txt2img", "img2img", "inpaint"]
POLL_SECONDS = 0.2  # how often a running job's progress is read


@dataclass(frozen=True)
class UISettings:
    """What the form offers: the model's default size (pixels) and its size step, the default steps, guidance
    and sampler, the sampler choices (all, and img2img's), whether an inpainting model is loaded, whether the
    server offers LoRAs (``--lora-dir``: the page shows its LoRA picker), and the server's limits on sides, steps
    and batch."""

    width: int = 1024
    height: int = 1024
    size_step: int = 64
    steps: int = 50
    guidance_scale: float = 3.0
    sampler: str = "original"
    samplers: tuple[str, ...] = sampler_names()
    img2img_samplers: tuple[str, ...] = sampler_names(for_img2img=True)
    inpainting: bool = True
    loras: bool = False
    max_side: int = 2048
    max_steps: int = 150
    max_batch: int = 8
    title: str = "Kandinsky 3"


def settings_for(pipeline: Any, *, inpainting: bool, **limits: Any) -> UISettings:
    """The form's defaults from a loaded pipeline: its ``sampling_defaults`` (size, steps, guidance, sampler, each
    falling back to the pipeline's own) and its size multiple; ``limits``: other :class:`UISettings` fields."""
    defaults = pipeline.sampling_defaults
    sampler = defaults.sampler or pipeline.default_sampler
    guidance = pipeline.default_guidance_scale if defaults.guidance_scale is None else defaults.guidance_scale
    steps = defaults.steps or get_sampler(sampler).default_steps  # the model's steps go with its sampler
    return UISettings(width=defaults.width, height=defaults.height,
                      size_step=size_multiple(pipeline.unet, pipeline.movq), steps=steps,
                      guidance_scale=float(guidance), sampler=sampler, inpainting=inpainting, **limits)


@dataclass(frozen=True)
class UIRequest:
    """One generation the page asks for. ``seed`` −1 means a random one; ``image`` is the img2img or inpainting
    input (RGB), ``mask`` the inpainting one ((H, W) float32 at the image's size, 1 = repaint), ``strength`` the
    img2img share of the timestep list."""

    mode: Mode
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    batch: int
    image: Image.Image | None = None
    mask: np.ndarray | None = None
    strength: float = 0.5


@dataclass(frozen=True)
class JobStatus:
    """Where a job stands: "queued" (``position`` jobs ahead of it), "running" (sampler ``step`` of ``steps``),
    "done" (``images`` with their ``seeds``), "failed" (``message`` says why) or "cancelled"."""

    state: Literal["queued", "running", "done", "failed", "cancelled"]
    step: int = 0
    steps: int = 0
    position: int = 0
    images: tuple[Image.Image, ...] = ()
    seeds: tuple[int, ...] = ()
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class UIBackend(Protocol):
    """The job queue as the page sees it. ``submit`` raises a ValueError whose message the user reads when the
    request is refused (bad input, queue full); ``poll`` and ``cancel`` take what ``submit`` returned."""

    def submit(self, request: UIRequest) -> Hashable: ...

    def poll(self, handle: Hashable) -> JobStatus: ...

    def cancel(self, handle: Hashable) -> None: ...

    def loras(self, refresh: bool = False) -> list[str]:
        """The names of the LoRAs a prompt may name with ``<lora:name:scale>``; ``refresh``: scan the folder again."""
        ...


# --------------------------------------------------------------------------------------------------------------
# From the form to a request, from a status to the page
# --------------------------------------------------------------------------------------------------------------


def inpainting_mask(editor: dict[str, Any] | None) -> tuple[Image.Image, np.ndarray]:
    """The uploaded image (RGB) and the painted area ((H, W) float32, 1 = repaint) of an ImageEditor value
    (``{"background", "layers", "composite"}`` PIL images); a ValueError when no image or no stroke."""
    background = (editor or {}).get("background")
    if background is None:
        raise ValueError("upload an image to inpaint first")
    image = background.convert("RGB")
    mask = np.zeros((image.height, image.width), dtype=bool)
    for layer in editor.get("layers") or ():
        alpha = np.asarray(layer.convert("RGBA").resize(image.size, Image.NEAREST))[..., 3]  # (H, W)
        mask |= alpha > 0
    if not mask.any():
        raise ValueError("paint the area to repaint on the image (the brush marks it)")
    return image, mask.astype(np.float32)


def progress_html(status: JobStatus | None, note: str = "") -> str:
    """The progress bar: a <progress> of the sampler steps and one line of text; its data-state and data-step
    attributes let a test read it."""
    if status is None:
        state, step, steps, text = "idle", 0, 1, note or "idle"
    else:
        state, step, steps = status.state, status.step, max(status.steps, 1)
        seeds = ", ".join(str(seed) for seed in status.seeds)
        text = {
            "queued": f"queued, {status.position} job(s) ahead",
            "running": f"step {status.step} / {status.steps}",
            "done": f"done: {len(status.images)} image(s)" + (f", seed {seeds}" if seeds else ""),
            "failed": f"failed: {status.message}",
            "cancelled": "cancelled",
        }[state]
        step = steps if state == "done" else step
    return (f'<div class="k3-progress" data-state="{state}" data-step="{step}" data-steps="{steps}">'
            f'<progress max="{steps}" value="{step}" style="width:100%"></progress>'
            f'<div class="k3-progress-text">{html.escape(text)}</div></div>')


def gallery_items(status: JobStatus) -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs for the gallery, the caption naming each image's seed."""
    seeds = list(status.seeds) + [None] * (len(status.images) - len(status.seeds))
    return [(image, "" if seed is None else f"seed {seed}") for image, seed in zip(status.images, seeds)]


class _Sessions:
    """The job each browser session is waiting for, so that its Cancel button reaches it."""

    def __init__(self, backend: UIBackend):
        self.backend = backend
        self.jobs: dict[str, Hashable] = {}

    async def follow(self, session: str, request: UIRequest):
        """Submit ``request`` and yield (progress HTML, gallery update) until it ends; leaving early (the page
        closed, Gradio cancelled the event) cancels the job."""
        try:  # checking a request may resize its images: off the event loop
            handle = await asyncio.to_thread(self.backend.submit, request)
        except ValueError as error:
            yield progress_html(None, f"refused: {error}"), gr.skip()
            return
        self.jobs[session] = handle
        shown, status = None, None
        try:
            while not (status := self.backend.poll(handle)).finished:
                if status != shown:
                    shown = status
                    yield progress_html(status), gr.skip()
                await asyncio.sleep(POLL_SECONDS)
            yield progress_html(status), gallery_items(status) if status.state == "done" else gr.skip()
        finally:
            if self.jobs.get(session) == handle:
                del self.jobs[session]
            if status is None or not status.finished:
                logger.info("the page stopped waiting; its job is cancelled")
                self.backend.cancel(handle)

    def cancel(self, session: str) -> None:
        handle = self.jobs.get(session)
        if handle is not None:
            self.backend.cancel(handle)


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Form:
    """The shared inputs of every tab, in the order the handlers take them."""

    prompt: Any
    negative_prompt: Any
    width: Any
    height: Any
    steps: Any
    guidance_scale: Any
    sampler: Any
    seed: Any
    batch: Any

    def components(self) -> list[Any]:
        return [getattr(self, field.name) for field in dataclasses.fields(self)]


def _request(mode: Mode, values: Sequence[Any], **extra: Any) -> UIRequest:
    """A UIRequest from the form's values (in :class:`_Form` order) and a tab's own inputs."""
    prompt, negative, width, height, steps, guidance, sampler, seed, batch = values
    return UIRequest(mode=mode, prompt=(prompt or "").strip(), negative_prompt=(negative or "").strip() or None,
                     width=int(width), height=int(height), steps=int(steps), guidance_scale=float(guidance),
                     sampler=sampler, seed=-1 if seed is None else int(seed), batch=int(batch), **extra)


def _prompts() -> tuple[Any, Any]:
    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder="a red cat on a green sofa")
    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
    return prompt, negative


def _settings(prompts: tuple[Any, Any], settings: UISettings) -> _Form:
    """The settings accordion below the tabs; the form is the two prompts and these."""
    with gr.Accordion("Settings", open=True):
        step, top = settings.size_step, settings.max_side
        with gr.Row():
            width = gr.Slider(step, top, value=settings.width, step=step, label="Width", elem_id="width")
            height = gr.Slider(step, top, value=settings.height, step=step, label="Height", elem_id="height")
        with gr.Row():
            steps = gr.Slider(1, settings.max_steps, value=settings.steps, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(0.0, 20.0, value=settings.guidance_scale, step=0.5, label="Guidance scale",
                                 elem_id="guidance")
        with gr.Row():
            sampler = gr.Dropdown(list(settings.samplers), value=settings.sampler, label="Sampler",
                                  info=f"img2img: {', '.join(settings.img2img_samplers)}", elem_id="sampler")
            seed = gr.Number(-1, precision=0, label="Seed (−1: random)", elem_id="seed")
            batch = gr.Slider(1, settings.max_batch, value=1, step=1, label="Batch", elem_id="batch")
    return _Form(*prompts, width, height, steps, guidance, sampler, seed, batch)


def _lora_picker(prompt: Any, backend: UIBackend) -> None:
    """A LoRA list, a weight and "Add to prompt", which writes ``<lora:name:weight>`` into the prompt (replacing
    that LoRA's weight if the prompt names it), as AUTOMATIC1111's LoRA cards do; ↻ scans the folder again. The tag
    in the prompt is what applies the LoRA, so the prompt shows, and the image's parameters keep, what ran."""
    names = backend.loras()
    with gr.Row(equal_height=True):
        choice = gr.Dropdown(names, value=names[0] if names else None, label="LoRA", scale=3, elem_id="lora")
        weight = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA weight", scale=3, elem_id="lora-weight")
        add = gr.Button("Add to prompt", scale=1, elem_id="lora-add")
        refresh = gr.Button("↻", scale=0, min_width=40, elem_id="lora-refresh")

    def add_tag(text: str, name: str | None, scale: float) -> str:
        return with_prompt_lora(text or "", name, float(scale)) if name else gr.skip()

    def rescan(current: str | None) -> Any:
        found = backend.loras(refresh=True)
        return gr.Dropdown(choices=found, value=current if current in found else (found[0] if found else None))

    add.click(add_tag, inputs=[prompt, choice, weight], outputs=prompt, queue=False, api_visibility="private")
    refresh.click(rescan, inputs=choice, outputs=choice, queue=False, api_visibility="private")


def build_ui(backend: UIBackend, settings: UISettings = UISettings()) -> gr.Blocks:
    """The page: the shared form, one tab per mode with its Generate button, the progress bar, the gallery and a
    Cancel button, wired to ``backend``."""
    sessions = _Sessions(backend)
    # the images shown are files in Gradio's cache folder: delete those older than an hour, every hour
    with gr.Blocks(title=settings.title, analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"## {html.escape(settings.title)}")
        with gr.Row():
            with gr.Column(scale=1):
                prompts = _prompts()
                if settings.loras:
                    _lora_picker(prompts[0], backend)
                with gr.Tabs():
                    with gr.Tab("Text to image", id="txt2img"):
                        txt2img = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Tab("Image to image", id="img2img"):
                        init_image = gr.Image(type="pil", image_mode="RGB",
                                              label="Input image (resized to Width × Height)",
                                              sources=["upload", "clipboard"], height=320,
                                              elem_id="img2img-image")
                        strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Strength",
                                             elem_id="strength")
                        img2img = gr.Button("Generate", variant="primary", elem_id="img2img-generate")
                    with gr.Tab("Inpainting", id="inpaint", visible=settings.inpainting):
                        editor = gr.ImageEditor(type="pil", image_mode="RGBA", label="Paint the area to repaint",
                                                sources=["upload", "clipboard"], layers=False, transforms=(),
                                                brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff",
                                                               color_mode="fixed"),
                                                elem_id="inpaint-editor")
                        inpaint = gr.Button("Inpaint", variant="primary", elem_id="inpaint-generate")
                form = _settings(prompts, settings)
            with gr.Column(scale=1):
                progress = gr.HTML(progress_html(None), elem_id="progress")
                gallery = gr.Gallery(label="Images", columns=2, height=560, object_fit="contain", format="png",
                                     elem_id="gallery")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
        _wire(sessions, form, [(txt2img, "txt2img", []), (img2img, "img2img", [init_image, strength]),
                               (inpaint, "inpaint", [editor])], [progress, gallery])

        def cancel_job(request: gr.Request) -> None:
            sessions.cancel(request.session_hash)

        cancel.click(cancel_job, inputs=None, outputs=None, concurrency_limit=None, queue=False,
                     api_visibility="private")
    return blocks


def _wire(sessions: _Sessions, form: _Form, buttons: list[tuple[Any, Mode, list[Any]]], outputs: list[Any]) -> None:
    """Each Generate button runs its mode: the form's values, then the tab's own inputs."""
    def handler(mode: Mode):
        async def run(request: gr.Request, *values: Any):
            try:
                extra = _tab_inputs(mode, values[len(form.components()):])
                job = _request(mode, values[:len(form.components())], **extra)
            except ValueError as error:
                yield progress_html(None, f"refused: {error}"), gr.skip()
                return
            async for update in sessions.follow(request.session_hash, job):
                yield update

        return run

    for button, mode, inputs in buttons:
        button.click(handler(mode), inputs=form.components() + inputs, outputs=outputs, concurrency_limit=None,
                     show_progress="hidden", api_visibility="private")


def _tab_inputs(mode: Mode, values: Sequence[Any]) -> dict[str, Any]:
    """The UIRequest fields of a tab's own inputs: img2img's image and strength, inpainting's image and mask."""
    if mode == "img2img":
        image, strength = values
        if image is None:
            raise ValueError("upload an input image first")
        return {"image": image.convert("RGB"), "strength": float(strength)}
    if mode == "inpaint":
        image, mask = inpainting_mask(values[0])
        return {"image": image, "mask": mask}
    return {}


def mount_ui(app: fastapi.FastAPI, backend: UIBackend, settings: UISettings = UISettings(),
             path: str = "/") -> fastapi.FastAPI:
    """Mount the page on ``app`` at ``path``. Call it after the API routes are added: a mount at "/" would
    otherwise answer their paths. The theme uses the browser's own fonts, so the page loads nothing from
    outside the server."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, build_ui(backend, settings), path=path, theme=theme, footer_links=[])
