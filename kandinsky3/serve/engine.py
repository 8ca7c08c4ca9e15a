"""The model behind the server: the pipelines of one model on one device, what a request asks of them, and the
runner that executes a request as a job (:mod:`kandinsky3.serve.jobs`).

    engine = Engine.load("tiny", device="cpu")           # text-to-image, img2img, inpainting; loaded once
    prepared = engine.prepare(ImageRequest("text-to-image", "a red circle", steps=20), Limits())  # or UsageError
    job = queue.submit(prepared)                          # a JobQueue whose runner is engine.run
    result = job.result()                                 # ImageResult: images, seeds, PNGs with parameters

One model serves every task: img2img runs on the text-to-image pipeline's own modules, and the inpainting pipeline
takes the MoVQ and the T5 from it when its checkpoint holds the same weights (its U-Net and text projection are its
own). Each text encoder caches its encoded prompts (:mod:`kandinsky3.serve.prompt_cache`).

LoRAs (``lora_dir``, :mod:`kandinsky3.serve.loras`): a prompt names them with AUTOMATIC1111's ``<lora:name:scale>``
tags. :meth:`Engine.prepare` takes the tags out of the prompt that is encoded (and out of the negative prompt,
where they are ignored, as in A1111) and refuses unknown names before the job is queued; :meth:`Engine.run` sets
the adapters to the request's before sampling. The PNG ``parameters`` keep the prompt as it was sent, tags
included.

Guidance is the library's w (ε = (w+1)·ε_cond − w·ε_uncond); the APIs translate their own conventions.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from ..diffusion import registry
from ..errors import UsageError
from ..lora import parse_prompt_loras
from ..pipelines import Kandinsky3Img2ImgPipeline, LoadOptions, load_pipeline
from ..pipelines.checks import GenerationRequest, size_multiple
from ..png_info import format_parameters, png_bytes
from ..weights import CheckpointError
from .jobs import Job, JobInterrupted, SkipBatch
from .loras import LoadedLoras, LoraLibrary, Tags
from .prompt_cache import cache_prompts

logger = logging.getLogger(__name__)

__all__ = ["Engine", "ImageRequest", "ImageResult", "Limits", "PreparedRequest", "Task"]

Task = Literal["text-to-image", "img2img", "inpainting"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: image sides in pixels, sampler steps, images (all batches together)."""

    max_side: int = 2048
    max_steps: int = 150
    max_images: int = 8


@dataclass(frozen=True)
class ImageRequest:
    """One generation. ``image`` (RGB) is the img2img/inpainting input, ``mask`` the inpainting one ((H, W) at the
    image's size, 1 or 255 = repaint; a PIL image or an array). ``width``/``height``: the output size (None: the
    model's, or the input image's); an input image of another size is resized to it first. ``batch_size`` images
    are sampled together, ``n_iter`` times; image i has seed ``seed + i`` (None: drawn by :meth:`Engine.prepare`).
    ``steps``, ``guidance_scale`` (w), ``sampler``, ``eta``: None means the model's default."""

    task: Task
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    eta: float | None = None
    seed: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    image: Image.Image | None = None
    mask: Any = None
    strength: float = 0.75


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready to run: as asked (``request``, its input image and mask at the output size), one of its
    batches as the pipeline checked it (``checked``: seed, sampler, steps, guidance and sizes resolved; the prompts
    without their LoRA tags) and the LoRAs its prompt names (``loras``: ((name, scale), ...))."""

    request: ImageRequest
    checked: GenerationRequest
    loras: Tags = ()

    @property
    def task(self) -> Task:
        return self.request.task

    @property
    def output_size(self) -> tuple[int, int]:
        sizes = self.checked.output_sizes
        return sizes[0] if sizes else (self.checked.width, self.checked.height)


@dataclass(frozen=True)
class ImageResult:
    """The images of a finished request with their seeds and PNG files (A1111 ``parameters`` text chunk written),
    what ran, and whether ``interrupt()`` cut it short."""

    images: list[Image.Image]
    seeds: list[int]
    pngs: list[bytes]
    parameters: list[str]
    prepared: PreparedRequest
    interrupted: bool = False


class Engine:
    """The pipelines of one model on one device (see the module docstring). ``model_name`` names the model in
    API answers and PNG metadata; ``lora_dir`` holds the LoRA files requests may name (None: none)."""

    def __init__(self, text_to_image, inpainting=None, *, model_name: str = "kandinsky3",
                 lora_dir: str | Path | None = None):
        self.text_to_image = text_to_image
        self.img2img = _img2img_view(text_to_image)
        self.inpainting = inpainting
        self.model_name = model_name
        self.multiple = size_multiple(text_to_image.unet, text_to_image.movq)
        pipes = {task: pipe for task, pipe in (("text-to-image", text_to_image), ("img2img", self.img2img),
                                               ("inpainting", inpainting)) if pipe is not None}
        if lora_dir is not None and any(pipe.residency.reload.keys() & {"unet", "text_encoder"}
                                        for pipe in pipes.values()):
            raise UsageError("--lora-dir needs the U-Net and the text encoder in memory; it does not go with "
                             "--offload disk")
        self.loras = LoraLibrary(lora_dir, {task: pipe.unet for task, pipe in pipes.items()})
        shared = LoadedLoras(text_to_image, self.loras)  # img2img runs on the text-to-image modules
        self.loaded_loras = {"text-to-image": shared, "img2img": shared}
        if inpainting is not None:
            self.loaded_loras["inpainting"] = LoadedLoras(inpainting, self.loras)

    @classmethod
    def load(cls, model: str | Path = "tiny", *, device: Any = "cpu", options: LoadOptions = LoadOptions(),
             inpainting: bool = True, prompt_cache: int = 64, lora_dir: str | Path | None = None) -> Engine:
        """Load ``model`` once on ``device``: the text-to-image pipeline and, unless ``inpainting`` is False or
        the model has no inpainting weights, the inpainting one sharing what it can; ``lora_dir`` is scanned for
        LoRA files."""
        base = load_pipeline("text-to-image", model, device=device, options=options)
        inpaint = None
        if inpainting:
            try:
                inpaint = load_pipeline("inpainting", model, device=device, options=options)
            except (CheckpointError, FileNotFoundError) as error:
                logger.warning("no inpainting weights for %s (%s); inpainting requests will be refused", model, error)
            else:
                _share_components(base, inpaint)
        for pipe in (base, inpaint):
            if pipe is not None:
                cache_prompts(pipe.text_encoder, prompt_cache)
        name = "kandinsky3-" + (str(model) if str(model) == "tiny" else Path(str(model)).name)
        return cls(base, inpaint, model_name=name, lora_dir=lora_dir)

    def pipeline(self, task: Task):
        if task == "inpainting":
            if self.inpainting is None:
                raise UsageError("this server has no inpainting model loaded (the model has no inpainting weights, "
                                 "or the server runs with --no-inpainting)")
            return self.inpainting
        if task not in ("text-to-image", "img2img"):
            raise UsageError(f"unknown task {task!r}")
        return self.img2img if task == "img2img" else self.text_to_image

    def default_sampler(self, task: Task) -> str:
        """The sampler a request of ``task`` that names none runs: the model's, else the pipeline's."""
        return self.pipeline(task).default_sampler

    def samplers(self, task: Task = "text-to-image") -> tuple[str, ...]:
        return registry.sampler_names(for_img2img=task == "img2img")

    # ----------------------------------------------------------------------------- before the queue

    def prepare(self, request: ImageRequest, limits: Limits = Limits()) -> PreparedRequest:
        """``request`` checked against the server's ``limits`` and by the pipeline's own check
        (:func:`~kandinsky3.pipelines.checks.check_generation`), every default resolved so that it reproduces
        exactly; a UsageError names what is wrong (an unknown LoRA in the prompt too)."""
        pipe = self.pipeline(request.task)
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise UsageError("prompt must be a non-empty string")
        prompt, tags = _without_tags(request.prompt)
        if not prompt:
            raise UsageError("prompt must hold more than <lora:…> tags")
        loras = self.loras.check(tags, request.task)
        negative = request.negative_prompt
        if isinstance(negative, str):  # A1111 reads LoRA tags in the prompt only
            negative = _without_tags(negative)[0] or None
        count = request.batch_size * request.n_iter
        if request.batch_size < 1 or request.n_iter < 1 or count > limits.max_images:
            raise UsageError(f"a request makes 1 to {limits.max_images} images; got {request.batch_size} × "
                             f"{request.n_iter}")
        for name in ("width", "height"):
            side = getattr(request, name)
            if side is not None and not 0 < side <= limits.max_side:
                raise UsageError(f"{name} must be in [1, {limits.max_side}] pixels, got {side}")
        request = self._inputs_at_output_size(request)
        arguments = dict(prompt=prompt, negative_prompt=negative, steps=request.steps,
                         guidance_scale=request.guidance_scale, sampler=request.sampler, eta=request.eta,
                         seed=request.seed, num_images_per_prompt=request.batch_size, progress=False)
        if request.task == "text-to-image":
            arguments.update(width=request.width, height=request.height)
        elif request.task == "img2img":
            arguments.update(image=request.image, strength=request.strength)
        else:
            arguments.update(image=request.image, mask=request.mask)
        checked = pipe.check(**arguments)
        if checked.steps > limits.max_steps:
            raise UsageError(f"steps must be in [1, {limits.max_steps}], got {checked.steps}")
        if max(checked.width, checked.height) > limits.max_side:
            raise UsageError(f"{checked.width}x{checked.height} is over this server's limit of {limits.max_side} "
                             "pixels a side")
        return PreparedRequest(request, checked, loras)

    @staticmethod
    def _inputs_at_output_size(request: ImageRequest) -> ImageRequest:
        """The input image (RGB) and mask resized to the requested width × height (A1111's "just resize")."""
        if request.task == "text-to-image":
            return request
        if request.image is None:
            raise UsageError(f"{request.task} needs an input image")
        image, mask = request.image.convert("RGB"), request.mask
        if isinstance(mask, Image.Image) and mask.size != image.size:
            raise UsageError(f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                             "they must have the same size")
        size = (request.width or image.width, request.height or image.height)
        if size != image.size:
            image = image.resize(size, Image.LANCZOS)
            if isinstance(mask, Image.Image):
                mask = mask.resize(size, Image.BILINEAR)
            elif mask is not None:
                raise UsageError("an array mask must come with an image of the output size")
        return dataclasses.replace(request, image=image, mask=mask)

    # ----------------------------------------------------------------------------- in the worker

    def run(self, job: Job) -> ImageResult:
        """Run ``job.request`` (a :class:`PreparedRequest`): ``n_iter`` batches with progress after every sampler
        step and ``job.checkpoint()`` between steps (skip drops a batch; interrupt keeps the finished ones). The
        adapters are set to the request's LoRAs first (none named: all at scale 0)."""
        prepared: PreparedRequest = job.request
        pipe, checked, n_iter = self.pipeline(prepared.task), prepared.checked, prepared.request.n_iter
        self.loaded_loras[prepared.task].apply(prepared.loras)
        per_batch, count = len(checked.plan.timesteps), checked.num_images
        images, seeds = [], []
        for batch in range(n_iter):
            first = checked.seed + batch * count

            def report(info: dict, done: int = batch * per_batch) -> None:
                job.set_progress(done + info["step"] + 1, per_batch * n_iter)
                job.checkpoint()

            try:
                job.checkpoint()
                images += pipe.generate(dataclasses.replace(checked, seed=first, callback=report))
                seeds += range(first, first + count)
            except SkipBatch:
                continue
            except JobInterrupted:
                if not images:
                    raise
                break
        parameters = [self.parameters(prepared, seed) for seed in seeds]
        pngs = [png_bytes(image, text) for image, text in zip(images, parameters)]
        return ImageResult(images, seeds, pngs, parameters, prepared, interrupted=job.interrupted)

    def parameters(self, prepared: PreparedRequest, seed: int) -> str:
        """AUTOMATIC1111's ``parameters`` text of one image (written into its PNG, read back by /png-info)."""
        checked, (width, height) = prepared.checked, prepared.output_size
        extra = {"Task": prepared.task}
        if checked.strength is not None:
            extra["Denoising strength"] = checked.strength
        return format_parameters(prepared.request.prompt, prepared.request.negative_prompt or "",
                                 steps=checked.steps, sampler=checked.sampler, guidance_scale=checked.guidance_scale,
                                 seed=seed, width=width, height=height, model=self.model_name, **extra)


def _without_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """``prompt`` without its ``<lora:name:scale>`` tags, and the tags; a prompt without tags stays as it is."""
    cleaned, tags = parse_prompt_loras(prompt)
    return (cleaned, tags) if tags else (prompt, tags)


def _img2img_view(base) -> Kandinsky3Img2ImgPipeline:
    """An img2img pipeline over the text-to-image pipeline's modules, residency and settings (no copy)."""
    view = Kandinsky3Img2ImgPipeline(base.unet, base.movq, base.text_encoder, conditioning=base.conditioning,
                                     scheduler_config=base.scheduler_config, sampling_defaults=base.sampling_defaults)
    view.residency, view.decode_tiling = base.residency, base.decode_tiling
    if hasattr(base, "devices"):  # where load_pipeline placed the components
        view.devices = base.devices
    return view


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    if type(a) is not type(b):
        return False
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype and not ours[k].is_meta
        and torch.equal(ours[k], theirs[k]) for k in ours)


def _share_components(base, inpaint) -> None:
    """Point the inpainting pipeline at the base pipeline's MoVQ and T5 where they hold the same weights, so that
    one copy of each stays in memory."""
    if _same_weights(base.movq, inpaint.movq):
        inpaint.movq = base.movq
    if _same_weights(base.text_encoder.t5, inpaint.text_encoder.t5):
        inpaint.text_encoder.t5 = base.text_encoder.t5
    shared = [name for name, same in (("MoVQ", inpaint.movq is base.movq),
                                      ("T5", inpaint.text_encoder.t5 is base.text_encoder.t5)) if same]
    logger.info("inpainting shares %s with text-to-image", ", ".join(shared) or "nothing")
