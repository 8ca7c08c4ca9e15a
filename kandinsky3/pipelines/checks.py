"""One check of a generation call, shared by the pipelines, the command line and the server, runnable before any
weights are read.

    facts = model_facts("tiny", "text-to-image")              # configs and headers only (or ModelFacts.of_pipeline)
    request = check_generation("text-to-image", facts, prompt="a red circle", width=64, height=64, seed=1)
    images = pipe.generate(request)                            # what pipe(prompt, width=..., ...) does after the check

:func:`check_generation` checks every argument of a call against the model (:class:`ModelFacts`) and returns them
normalised, with the model's defaults filled in, as a :class:`GenerationRequest`; a pipeline's ``__call__`` runs
exactly this function first. Every refusal is a :class:`~kandinsky3.errors.UsageError` (a
:class:`~kandinsky3.errors.UsageTypeError` for a value of the wrong type) whose one-line message names the value
and what would be accepted. The memory and time estimates behind the size limits are in
:mod:`kandinsky3.pipelines.budget`.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..components import SamplingDefaults
from ..diffusion import registry, schedule
from ..errors import UsageError, UsageTypeError, validating
from ..lowmem.residency import is_released
from ..lowmem.storage import compute_dtype
from ..models.movq import MoVQConfig
from ..models.unet_config import UNetConfig
from . import budget
from .images import prepare_mask, working_size
from .sampling import SamplingChoice, SamplingPlan, plan_sampling

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_SEED", "OUTPUT_TYPES", "TASK_ARGUMENTS", "GenerationRequest", "ModelFacts", "PromptBatch", "as_prompt_list",
    "check_generation", "check_size", "default_sampler", "draw_seed", "guidance_weight", "model_facts",
    "prompts_per_image", "size_multiple",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**63 - 1
_COMMON = {"prompt": None, "negative_prompt": None, "num_images_per_prompt": 1, "images_num": None, "bs": None,
           "steps": None, "num_inference_steps": None, "guidance_scale": None, "sampler": None, "eta": None,
           "seed": None, "generator": None, "callback": None, "progress": True, "output_type": "pil"}
_TEXT_TO_IMAGE = {"width": None, "height": None, "latents": None, "decode_slice_size": 1}
TASK_ARGUMENTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({  # every task's arguments and their defaults
    "text-to-image": MappingProxyType({**_COMMON, **_TEXT_TO_IMAGE}),
    "flash": MappingProxyType({**_COMMON, **_TEXT_TO_IMAGE}),
    "img2img": MappingProxyType({**_COMMON, "image": None, "strength": 0.3, "width": None, "height": None}),
    "inpainting": MappingProxyType({**_COMMON, "image": None, "mask": None, "guidance_weight_text": None,
                                    "paste_back": True}),
})
_REQUIRED = {"text-to-image": ("prompt",), "flash": ("prompt",), "img2img": ("prompt", "image"),
             "inpainting": ("prompt", "image", "mask")}
_ALIASES = (("num_inference_steps", "steps"), ("images_num", "num_images_per_prompt"),
            ("guidance_weight_text", "guidance_scale"))  # (alias, name): diffusers' and the original's names


# ----------------------------------------------------------------------------------------------------- the model


def size_multiple(unet: torch.nn.Module, movq: torch.nn.Module) -> int:
    """Image sides must be multiples of this: MoVQ factor × U-Net factor (8 × 8 = 64 for the released models)."""
    return movq.config.downsample_factor * unet.config.downsample_factor


def default_sampler(task: str, defaults: SamplingDefaults, scheduler_config: Mapping[str, Any] | None) -> str:
    """The sampler of a call that names none: "flash" for the Flash weights, else the model's, else "ddpm" for
    weights that brought a diffusers scheduler config (as diffusers does), else Kandinsky's "original"."""
    if task == "flash":
        return "flash"
    return defaults.sampler or ("ddpm" if scheduler_config is not None else "original")


def _per_phase(value: Any) -> Mapping[str, Any]:
    return MappingProxyType({"unet": value, "movq": value})


@dataclass(frozen=True, eq=False)
class ModelFacts:
    """What checking a call needs to know about a model, without its weights.

    task: "text-to-image", "flash", "inpainting" or "img2img" (the pipeline the facts describe).
    unet_config, movq_config: the networks' configs (size multiple, latent channels, memory and time estimates).
    sampling_defaults: the model's size and, where recorded, guidance, steps and sampler.
    default_sampler, default_guidance_scale, threshold_percentile: the pipeline's own choices where the model
        records none (:func:`default_sampler`; 3.0 or 4.0 for inpainting; dynamic thresholding percentile).
    scheduler_config: a diffusers checkpoint's scheduler config (sets the timesteps of "ddpm"/"ddim").
    devices, compute_dtypes: per phase ("unet", "movq") the device it runs on and the dtype it computes in.
    pending_bytes: per phase, the bytes of weights that are not in that device's memory yet but will be while the
        phase runs (all of them before loading; offloaded or disk-waiting components after).
    decode_tile: the side of a decode tile in latent pixels when the MoVQ decodes in tiles, else None.
    """

    task: str
    unet_config: UNetConfig
    movq_config: MoVQConfig
    sampling_defaults: SamplingDefaults
    default_sampler: str
    default_guidance_scale: float
    threshold_percentile: float
    scheduler_config: Mapping[str, Any] | None = None
    devices: Mapping[str, torch.device] = field(default_factory=lambda: _per_phase(torch.device("cpu")))
    compute_dtypes: Mapping[str, torch.dtype] = field(default_factory=lambda: _per_phase(torch.float32))
    pending_bytes: Mapping[str, int] = field(default_factory=lambda: _per_phase(0))
    decode_tile: int | None = None

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel along a side (the MoVQ's downsampling factor, 8 for the released models)."""
        return self.movq_config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: MoVQ factor × U-Net factor (64 for the released and the bundled
        models)."""
        return self.latent_factor * self.unet_config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.unet_config.out_channels

    @property
    def flash(self) -> bool:
        return self.task == "flash"

    @property
    def inpainting(self) -> bool:
        """Whether the U-Net takes inpainting's extra channels (x_t, keep-mask, masked latent: 9)."""
        return self.unet_config.num_channels == 2 * self.movq_config.z_channels + 1

    @classmethod
    def of_pipeline(cls, pipe: Any) -> ModelFacts:
        """The facts of a built pipeline: its networks' configs, defaults, devices and residency."""
        modules = {"unet": pipe.unet, "movq": pipe.movq}
        devices = {name: _run_device(pipe, name, module) for name, module in modules.items()}
        pending = {name: _weight_bytes(module) if _arrives(pipe, name, module, devices[name]) else 0
                   for name, module in modules.items()}
        tiling = pipe.decode_tiling
        return cls(
            task=pipe.task, unet_config=pipe.unet.config, movq_config=pipe.movq.config,
            sampling_defaults=pipe.sampling_defaults, default_sampler=pipe.default_sampler,
            default_guidance_scale=pipe.default_guidance_scale, threshold_percentile=pipe.threshold_percentile,
            scheduler_config=pipe.scheduler_config, devices=MappingProxyType(devices),
            compute_dtypes=MappingProxyType({name: compute_dtype(module) for name, module in modules.items()}),
            pending_bytes=MappingProxyType(pending), decode_tile=None if tiling is None else tiling.tile,
        )


def _run_device(pipe: Any, name: str, module: torch.nn.Module) -> torch.device:
    """Where component ``name`` computes: its offload device, the loader's record, or where its weights are."""
    if pipe.residency.offload is not None:
        return pipe.residency.offload[name]
    if getattr(pipe, "devices", None):
        return torch.device(pipe.devices[name])
    device = next(module.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def _arrives(pipe: Any, name: str, module: torch.nn.Module, device: torch.device) -> bool:
    """Whether the component's weights are brought to ``device`` when its phase starts (read from disk, or moved
    there from the CPU)."""
    if name in pipe.residency.reload:
        return is_released(module)
    return next(module.parameters()).device != device


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def model_facts(model: Any, task: str, options: Any = None, *, device: Any = "auto") -> ModelFacts:
    """The :class:`ModelFacts` of ``task`` on ``model`` (as :func:`~kandinsky3.pipelines.load.load_pipeline` takes
    them, with its :class:`~kandinsky3.pipelines.load.LoadOptions` and ``device``), read from configs and file
    headers only: no weights are loaded. Bad arguments raise what ``load_pipeline`` would."""
    from .load import inspect_model  # the loader imports the pipelines, which import this module

    return inspect_model(task, model, device=device, options=options)


# ----------------------------------------------------------------------------------------------------- arguments


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to about ``limit`` characters (a tensor passed by mistake stays short)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _type_error(name: str, accepted: str, value: Any) -> UsageTypeError:
    return UsageTypeError(f"{name} must be {accepted}, got {_short(value)} ({type(value).__name__})")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _count(name: str, value: Any, minimum: int = 1) -> int:
    """An int >= ``minimum`` (numpy ints too; bools and floats are refused)."""
    if not _is_int(value):
        raise _type_error(name, f"an int >= {minimum}", value)
    if value < minimum:
        raise UsageError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _number(name: str, value: Any, minimum: float | None = None) -> float:
    """A finite real number (>= ``minimum`` when given)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise _type_error(name, "a number", value)
    value = float(value)
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum:g}, got {value:g}")
    return value


def _seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise (UsageError if _is_int(seed) else UsageTypeError)(
            f"seed must be an int in [0, 2**63 - 1] (or None for a random one), got {_short(seed)}")
    return int(seed)


def draw_seed() -> int:
    """A random seed for a call that gives none (drawn from torch's global generator, so ``torch.manual_seed``
    makes unseeded calls repeatable), logged so the images can be made again."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    logger.info("no seed given; using seed %d", seed)
    return seed


def _generators(generator: Any, count: int) -> torch.Generator | list[torch.Generator] | None:
    """None, one generator, or a list of exactly ``count`` (one per image)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise _type_error("generator", "a torch.Generator or a list of them", generator)
    if len(generator) != count:
        raise UsageError(f"got {len(generator)} generators for {count} images; pass one per image")
    return list(generator)


def as_prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """A str or a non-empty list of str as a list; anything else is a UsageTypeError."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise _type_error(name, "a str or a non-empty list of str", prompt)
    return prompts


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one call, one entry per image: each of the ``num_prompts`` prompts has ``images_per_prompt``
    consecutive images ([p0, p0, p1, p1, …]); ``negatives`` likewise, or None."""

    prompts: list[str]
    negatives: list[str] | None
    images_per_prompt: int

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) // self.images_per_prompt


def prompts_per_image(
    prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None, images_per_prompt: int = 1
) -> PromptBatch:
    """Prompts and negative prompts repeated per image; a negative str serves every prompt, a list has one per
    prompt."""
    prompts = as_prompt_list(prompt)
    negatives = None
    if negative_prompt is not None:
        negatives = as_prompt_list(negative_prompt, "negative_prompt")
        if isinstance(negative_prompt, str):
            negatives = negatives * len(prompts)
        elif len(negatives) != len(prompts):
            raise UsageError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        negatives = [n for n in negatives for _ in range(images_per_prompt)]
    return PromptBatch([p for p in prompts for _ in range(images_per_prompt)], negatives, images_per_prompt)


def check_size(width: Any, height: Any, multiple: int = 64) -> None:
    """Raise a UsageError naming the nearest valid sizes unless both sides are positive multiples of ``multiple``
    (the model's; see :attr:`ModelFacts.size_multiple`)."""
    for name, side in (("width", width), ("height", height)):
        if not _is_int(side):
            raise _type_error(name, f"a positive int (a multiple of {multiple})", side)
        if side <= 0:
            raise UsageError(f"{name} must be a positive multiple of {multiple}, got {side}")
        if side % multiple:
            lower, upper = side // multiple * multiple, (side // multiple + 1) * multiple
            nearest = f"{lower} and {upper}" if lower else f"{upper}"
            raise UsageError(f"{name}={side} is not a multiple of {multiple}; the nearest valid sizes are {nearest}")


# ----------------------------------------------------------------------------------------------------- sampling


def guidance_weight(guidance_scale: float | None, default: float, negative_prompt) -> float:
    """w in ε = (w+1)·ε_cond − w·ε_uncond: ``guidance_scale``, else ``default``; w finite and >= 0, and a
    negative prompt needs w > 0 (without guidance nothing reads it)."""
    w = default if guidance_scale is None else _number("guidance_scale", guidance_scale, minimum=0)
    if negative_prompt is not None and w == 0:
        raise UsageError("a negative prompt needs guidance (guidance_scale > 0)")
    return w


def _choose(facts: ModelFacts, arguments: dict[str, Any], eta: float | None) -> SamplingChoice:
    """What the call gave, else the model's defaults, else the pipeline's. The model's step count belongs to its
    sampler: it applies when the call names neither a sampler nor steps. Flash refuses what it would ignore."""
    steps, sampler, guidance = arguments["steps"], arguments["sampler"], arguments["guidance_scale"]
    negative = arguments["negative_prompt"]
    if facts.flash:
        given = {"guidance_scale": guidance, "negative_prompt": negative, "eta": eta,
                 "steps": steps if steps not in (None, 4) else None,
                 "sampler": sampler if sampler not in (None, "flash") else None}
        refused = [name for name, value in given.items() if value is not None]
        if refused:
            raise UsageError(f"Kandinsky Flash runs 4 fixed steps without guidance; it does not take {refused}")
        return SamplingChoice("flash", None, 0.0)
    defaults = facts.sampling_defaults
    default_w = facts.default_guidance_scale if defaults.guidance_scale is None else defaults.guidance_scale
    return SamplingChoice(sampler or facts.default_sampler, defaults.steps if steps is None and sampler is None
                          else steps, guidance_weight(guidance, default_w, negative))


def _sampling(task: str, facts: ModelFacts, arguments: dict[str, Any]) -> tuple[SamplingPlan, SamplingChoice, Any]:
    """(plan, choice, eta given) of the call; img2img's plan keeps the strength share of the timesteps."""
    if arguments["steps"] is not None:
        arguments["steps"] = _count("steps", arguments["steps"])
    sampler = arguments["sampler"]
    if sampler is not None and not isinstance(sampler, str):
        raise _type_error("sampler", f"a sampler name ({', '.join(registry.sampler_names())})", sampler)
    eta = None if arguments["eta"] is None else _number("eta", arguments["eta"], minimum=0)
    choice = _choose(facts, arguments, eta)
    plan = plan_sampling(choice, threshold=facts.threshold_percentile, scheduler_config=facts.scheduler_config,
                         eta=eta, flash_weights=facts.flash, img2img=task == "img2img")
    if task == "img2img":
        strength = _number("strength", arguments["strength"])
        plan = SamplingPlan(plan.function, schedule.img2img_timesteps(plan.timesteps, strength), plan.options, plan.w)
    return plan, choice, eta


# ----------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True, eq=False)
class _Geometry:
    """The working size of a call in pixels, its start latents or input image(s) and mask, and the size each
    prompt's images are returned at (None: the working size)."""

    width: int
    height: int
    latents: torch.Tensor | None = None
    image: tuple[Image.Image, ...] | torch.Tensor | None = None
    mask: np.ndarray | None = None
    output_sizes: tuple[tuple[int, int], ...] | None = None


def _check_latents(name: str, latents: Any, shape: tuple[int | None, ...]) -> torch.Tensor:
    """A finite floating tensor of ``shape`` (None entries: any size)."""
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise _type_error(name, "a floating-point torch.Tensor", latents)
    if latents.ndim != len(shape) or any(s is not None and s != g for s, g in zip(shape, latents.shape)):
        expected = ", ".join("N" if side is None else str(side) for side in shape)
        raise UsageError(f"{name} must have shape ({expected}), got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise UsageError(f"{name} hold NaN or infinite values; pass finite latents")
    return latents


def _text_to_image_geometry(facts: ModelFacts, arguments: dict[str, Any], batch: PromptBatch) -> _Geometry:
    defaults = facts.sampling_defaults
    width = defaults.width if arguments["width"] is None else arguments["width"]
    height = defaults.height if arguments["height"] is None else arguments["height"]
    check_size(width, height, facts.size_multiple)
    latents = arguments["latents"]
    if latents is not None:
        f = facts.latent_factor
        latents = _check_latents("latents", latents, (len(batch.prompts), facts.latent_channels, height // f,
                                                      width // f))
    return _Geometry(int(width), int(height), latents=latents)


def _one_or_per_prompt(count: int, num_prompts: int) -> None:
    if count not in (1, num_prompts):
        raise UsageError(f"got {count} images for {num_prompts} prompts; pass one, or one per prompt")


def _img2img_geometry(facts: ModelFacts, arguments: dict[str, Any], batch: PromptBatch) -> _Geometry:
    """Working size: ``width``/``height``, else the first image's size floored to the size multiple; the images
    come back at their input's size. A latent image keeps its size."""
    image, multiple = arguments["image"], facts.size_multiple
    if isinstance(image, torch.Tensor):
        if arguments["width"] is not None or arguments["height"] is not None:
            raise UsageError("width and height apply to PIL images; latents passed as the image keep their size")
        latents = _check_latents("image", image, (None, facts.movq_config.z_channels, None, None))
        _one_or_per_prompt(latents.shape[0], batch.num_prompts)
        f = facts.latent_factor
        check_size(latents.shape[-1] * f, latents.shape[-2] * f, multiple)
        return _Geometry(latents.shape[-1] * f, latents.shape[-2] * f, image=latents)
    images = [image] if isinstance(image, Image.Image) else image if isinstance(image, (list, tuple)) else None
    if not images or not all(isinstance(i, Image.Image) for i in images):
        raise _type_error("image", "a PIL image, a list of PIL images or (N, 4, h, w) latents", image)
    _one_or_per_prompt(len(images), batch.num_prompts)
    sizes = [i.size for i in images]
    width = max(multiple, sizes[0][0] // multiple * multiple) if arguments["width"] is None else arguments["width"]
    height = max(multiple, sizes[0][1] // multiple * multiple) if arguments["height"] is None else arguments["height"]
    check_size(width, height, multiple)
    if len(set(sizes)) > 1 and arguments["output_type"] in ("np", "pt"):
        raise UsageError(f"images of different sizes {sorted(set(sizes))} come back at their own sizes; pass "
                         "images of one size, or output_type='pil'")
    if (width, height) != sizes[0]:
        logger.info("img2img works at %dx%d (multiples of %d); the images come back at their input's size",
                    width, height, multiple)
    sizes = sizes * batch.num_prompts if len(sizes) == 1 else sizes
    return _Geometry(int(width), int(height), image=tuple(images), output_sizes=tuple(sizes))


def _inpainting_geometry(facts: ModelFacts, arguments: dict[str, Any], batch: PromptBatch) -> _Geometry:
    """Working size: the image's, scaled down to about 1 MP and floored to the size multiple; the images come back
    at the input's size."""
    image = arguments["image"]
    if not isinstance(image, Image.Image):
        raise _type_error("image", "a PIL image", image)
    if not isinstance(arguments["paste_back"], bool):
        raise _type_error("paste_back", "True or False", arguments["paste_back"])
    mask = prepare_mask(arguments["mask"], image.size)
    width, height = working_size(*image.size, facts.size_multiple)
    return _Geometry(width, height, image=(image,), mask=mask, output_sizes=(image.size,) * batch.num_prompts)


_GEOMETRY = {"text-to-image": _text_to_image_geometry, "flash": _text_to_image_geometry,
             "img2img": _img2img_geometry, "inpainting": _inpainting_geometry}


# ----------------------------------------------------------------------------------------------------- the call


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """A checked call, every default filled in (:func:`check_generation`); ``pipe.generate(request)`` runs it.

    task: the pipeline it is for. batch: the prompts and negative prompts, one entry per image.
    plan: the sampler run (function, timesteps — img2img's strength share only — options, guidance w).
    sampler, steps, guidance_scale, eta: the values that run (``steps`` is the sampler's whole step count, ``eta``
        None for samplers without one), for recording next to the images.
    seed: the seed of image 0 (image i uses seed + i), drawn at random when the call gave none; None when a
        ``generator`` was given instead.
    width, height: the working size in pixels (the latents are width/f × height/f).
    output_sizes: per prompt, the (width, height) its images are returned at (the input image's for img2img and
        inpainting); None: the working size.
    latents: text-to-image's start latents, or None. image: the input image(s) (a tuple of PIL images, or
        img2img's latents). mask: inpainting's (H, W) float32 mask, 1 = repaint. strength: img2img's.
    peak_bytes: the estimated peak memory of the call (:mod:`kandinsky3.pipelines.budget`).
    The rest are the call's options as given (``bs``, ``callback``, ``progress``, ``output_type``,
    ``decode_slice_size``, ``paste_back``, ``num_images_per_prompt``, ``generator``).
    """

    task: str
    batch: PromptBatch
    plan: SamplingPlan
    sampler: str
    steps: int
    guidance_scale: float
    eta: float | None
    seed: int | None
    width: int
    height: int
    output_sizes: tuple[tuple[int, int], ...] | None = None
    latents: torch.Tensor | None = None
    image: tuple[Image.Image, ...] | torch.Tensor | None = None
    mask: np.ndarray | None = None
    strength: float | None = None
    paste_back: bool = True
    num_images_per_prompt: int = 1
    bs: int | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    callback: Callable[[dict], None] | None = None
    progress: bool = True
    output_type: str = "pil"
    decode_slice_size: int | None = 1
    peak_bytes: int = 0

    @property
    def num_images(self) -> int:
        return len(self.batch.prompts)


def _arguments(task: str, facts: ModelFacts, given: dict[str, Any]) -> dict[str, Any]:
    """Every argument of ``task`` (given, else its default), aliases folded into their names; unknown or missing
    arguments and a task these facts cannot run are refused."""
    if task not in TASK_ARGUMENTS:
        raise UsageError(f"unknown task {task!r}; choose from {list(TASK_ARGUMENTS)}")
    if task != facts.task and {task, facts.task} != {"text-to-image", "img2img"}:
        raise UsageError(f"these are the facts of a {facts.task!r} model; {task!r} needs "
                         f"{'the 9-channel inpainting' if task == 'inpainting' else 'its own'} weights "
                         f"(model_facts(model, {task!r}))")
    known = TASK_ARGUMENTS[task]
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(known)}"
            raise UsageTypeError(f"{task} takes no argument {name!r}{hint}")
    for name in _REQUIRED[task][1:]:
        if given.get(name) is None:
            raise UsageError(f"{task} needs {name}=...")
    arguments = {**known, **given}
    for alias, name in _ALIASES:
        if alias in known and arguments[alias] is not None:
            if arguments[name] != known[name]:
                raise UsageError(f"pass either {alias} or {name}, not both")
            arguments[name] = arguments[alias]
    return arguments


def _options(arguments: dict[str, Any], images: int) -> dict[str, Any]:
    """The call's options besides sampling and images, checked."""
    bs, slice_size = arguments["bs"], arguments.get("decode_slice_size", 1)
    if arguments["output_type"] not in OUTPUT_TYPES:
        raise UsageError(f"output_type must be one of {OUTPUT_TYPES}, got {_short(arguments['output_type'])}")
    if arguments["callback"] is not None and not callable(arguments["callback"]):
        raise _type_error("callback", "a function of one dict, or None", arguments["callback"])
    if not isinstance(arguments["progress"], bool):
        raise _type_error("progress", "True or False", arguments["progress"])
    seed, generator = _seed(arguments["seed"]), _generators(arguments["generator"], images)
    if seed is not None and generator is not None:
        raise UsageError("pass either seed or generator, not both")
    return dict(
        bs=None if bs is None else _count("bs (images per U-Net batch)", bs),
        decode_slice_size=None if slice_size is None else _count("decode_slice_size", slice_size),
        seed=seed, generator=generator, callback=arguments["callback"], progress=arguments["progress"],
        output_type=arguments["output_type"],
    )


def check_generation(task: str, facts: ModelFacts, **arguments: Any) -> GenerationRequest:
    """Check a ``task`` call with ``arguments`` (the pipeline's keyword arguments: ``prompt``, ``negative_prompt``,
    ``width``, ``steps``/``num_inference_steps``, ``seed``, ``image``, ``mask``, ... see :data:`TASK_ARGUMENTS`)
    against the model ``facts`` describe, before anything runs, and return it as a :class:`GenerationRequest`.

    Refuses (UsageError, one line): unknown or missing arguments, values of the wrong type, non-finite numbers
    (guidance, eta, strength, latents), sizes that are not positive multiples of the model's size multiple or
    whose estimated memory exceeds what the devices have free, seeds outside [0, 2**63 − 1], sampler choices the
    weights cannot run, bad masks. Logs the estimated time per step of sizes far above the model's native one.
    """
    with validating():
        arguments = _arguments(task, facts, arguments)
        count = _count("num_images_per_prompt", arguments["num_images_per_prompt"])
        batch = prompts_per_image(arguments["prompt"], arguments["negative_prompt"], count)
        plan, choice, eta = _sampling(task, facts, arguments)
        geometry = _GEOMETRY[task](facts, arguments, batch)
        options = _options(arguments, len(batch.prompts))
        peak = _check_budget(task, facts, geometry, plan, options, len(batch.prompts))
    strength = _number("strength", arguments["strength"]) if task == "img2img" else None
    seed = draw_seed() if options["seed"] is None and options["generator"] is None else options["seed"]
    entry = registry.get_sampler(choice.sampler)
    return GenerationRequest(
        task=task, batch=batch, plan=plan, sampler=choice.sampler, steps=entry.default_steps if choice.steps is None
        else choice.steps, guidance_scale=plan.w, eta=entry.eta if eta is None else eta, width=geometry.width,
        height=geometry.height, output_sizes=geometry.output_sizes, latents=geometry.latents, image=geometry.image,
        mask=geometry.mask, strength=strength, paste_back=arguments.get("paste_back", True),
        num_images_per_prompt=count, peak_bytes=peak, **{**options, "seed": seed},
    )


def _check_budget(task: str, facts: ModelFacts, geometry: _Geometry, plan: SamplingPlan, options: dict[str, Any],
                  images: int) -> int:
    """:func:`budget.check_memory` of the call (refuses what would not fit), and the time warning for large
    sizes; returns the estimated peak bytes."""
    per_batch = min(options["bs"] or images, images)
    decode = (options["decode_slice_size"] or images) if task in ("text-to-image", "flash") else 1
    load = budget.Workload(geometry.width, geometry.height, per_batch * (2 if plan.w != 0 else 1),
                           min(decode, images), len(plan.timesteps))
    peak = budget.check_memory(facts, load)
    budget.log_step_time(facts, load, batches=-(-images // per_batch))
    return peak
