"""Checks of what a caller passes to a pipeline: prompts, image sizes, the options every call takes
(:class:`CallOptions`), guidance and sampler defaults, start latents.

Each check raises :class:`~kandinsky3.errors.UsageError` naming the offending value and what would be accepted (a
prompt that is not text is a TypeError). The pipelines run them before any network does; the command line and
the server use the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..components import SamplingDefaults
from ..errors import UsageError

__all__ = [
    "OUTPUT_TYPES", "CallOptions", "PromptBatch", "SamplingChoice", "as_prompt_list", "check_latents", "check_size",
    "choose_sampling", "guidance_weight", "prompts_per_image", "size_multiple",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_size(width: int, height: int, multiple: int = 64) -> None:
    """Raise a UsageError naming the nearest valid sizes unless both sides are positive multiples of ``multiple``."""
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side <= 0:
            raise UsageError(f"{name} must be a positive int, got {side!r}")
        if side % multiple:
            lower, upper = side // multiple * multiple, (side // multiple + 1) * multiple
            nearest = f"{lower} and {upper}" if lower else f"{upper}"
            raise UsageError(f"{name}={side} is not a multiple of {multiple}; the nearest valid sizes are {nearest}")


def size_multiple(unet: torch.nn.Module, movq: torch.nn.Module) -> int:
    """Image sides must be multiples of this: MoVQ factor × U-Net factor (8 × 8 = 64 for the released models)."""
    return movq.config.downsample_factor * unet.config.downsample_factor


def as_prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """A str or a non-empty list of str as a list; anything else is a TypeError."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a str or a non-empty list of str, got {prompt!r}")
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


@dataclass(frozen=True)
class CallOptions:
    """The keyword arguments every pipeline call takes besides its own (image, size, mask, ...); checked when made.

    num_images_per_prompt: images per prompt (``images_num`` is the original's name for it).
    bs: images per U-Net batch (the guided batch is twice that); None: all at once.
    steps: sampler steps; None: the model's (with its sampler), else the sampler's own (50 for "original", 25
        for "ddpm", "dpmpp_2m", "dpmpp_2m_sde"; :mod:`kandinsky3.diffusion.registry`).
    guidance_scale: w in ε = (w+1)·ε_cond − w·ε_uncond; None: the model's, else the pipeline's
        ``default_guidance_scale``; 0 disables guidance.
    sampler: "original", "original30", "ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde" ("flash" for the Flash
        weights); None: the pipeline's ``default_sampler``.
    eta: noise of the "original" (default 1) and "ddim" (default 0) samplers.
    seed / generator: ``seed`` gives image i a CPU generator seeded seed + i; or the caller's generator (one, or
        one per image). Neither: a random seed, logged.
    callback: called at each step with {"step", "t", "x", "x0"} (observe only).
    progress: show a progress bar over the denoising steps.
    output_type: "pil" (a list of PIL images), "np" ((B,H,W,3) in [0,1]), "pt" ((B,3,H,W) in [0,1]) or "latent"
        ((B,4,h,w)).
    """

    num_images_per_prompt: int = 1
    images_num: int | None = None
    bs: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    eta: float | None = None
    seed: int | None = None
    generator: torch.Generator | Sequence[torch.Generator] | None = None
    callback: Callable[[dict], None] | None = None
    progress: bool = True
    output_type: str = "pil"

    def __post_init__(self):
        if self.images_num is not None:
            if self.num_images_per_prompt != 1:
                raise UsageError("pass either images_num or num_images_per_prompt, not both")
            object.__setattr__(self, "num_images_per_prompt", self.images_num)
        count = self.num_images_per_prompt
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UsageError(f"num_images_per_prompt must be an int >= 1, got {count!r}")
        bs = self.bs
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise UsageError(f"bs (images per U-Net batch) must be an int >= 1, got {bs!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {OUTPUT_TYPES}, got {self.output_type!r}")


def guidance_weight(guidance_scale: float | None, default: float, negative_prompt) -> float:
    """w in ε = (w+1)·ε_cond − w·ε_uncond: ``guidance_scale``, else ``default``; w >= 0, and a negative prompt
    needs w > 0 (without guidance nothing reads it)."""
    w = default if guidance_scale is None else float(guidance_scale)
    if w < 0:
        raise UsageError(f"guidance_scale must be >= 0, got {w}")
    if negative_prompt is not None and w == 0:
        raise UsageError("a negative prompt needs guidance (guidance_scale > 0)")
    return w


@dataclass(frozen=True)
class SamplingChoice:
    """A call's sampler name, step count (None: the sampler's own) and guidance weight w."""

    sampler: str
    steps: int | None
    w: float


def choose_sampling(
    call: CallOptions, negative_prompt, *, defaults: SamplingDefaults, sampler_fallback: str, guidance_fallback: float
) -> SamplingChoice:
    """What the call gave, else the model's ``defaults``, else the pipeline's fallbacks. The model's step count
    belongs to its sampler: it applies when the call names neither a sampler nor steps."""
    steps = defaults.steps if call.steps is None and call.sampler is None else call.steps
    sampler = call.sampler or defaults.sampler or sampler_fallback
    default_w = guidance_fallback if defaults.guidance_scale is None else defaults.guidance_scale
    return SamplingChoice(sampler, steps, guidance_weight(call.guidance_scale, default_w, negative_prompt))


def check_latents(latents: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """Given start latents must have exactly ``shape`` (B, C, h, w)."""
    if latents is not None and tuple(latents.shape) != tuple(shape):
        raise UsageError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
