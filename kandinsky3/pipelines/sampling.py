"""The sampler run of a call: which sampler, steps and guidance weight were chosen (:class:`SamplingChoice`) and what
runs (:class:`SamplingPlan`), built from the sampler table (:mod:`kandinsky3.diffusion.registry`).

    plan = plan_sampling(SamplingChoice("original", 50, 3.0), threshold=0.99, scheduler_config=None)
    latents = plan.function(denoiser, x, plan.timesteps, alphas_cumprod, **plan.options)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..diffusion import registry

__all__ = ["SamplingChoice", "SamplingPlan", "plan_sampling"]


@dataclass(frozen=True)
class SamplingChoice:
    """A call's sampler name, step count (None: the sampler's own) and guidance weight w."""

    sampler: str
    steps: int | None
    w: float


@dataclass(frozen=True)
class SamplingPlan:
    """A call's sampler run: ``function(denoiser, x, timesteps, alphas_cumprod, **options)`` under guidance w."""

    function: Callable[..., torch.Tensor]
    timesteps: list[int]
    options: dict[str, Any]
    w: float


def plan_sampling(
    choice: SamplingChoice,
    *,
    threshold: float | None,
    scheduler_config: Mapping[str, Any] | None,
    eta: float | None = None,
    flash_weights: bool = False,
    img2img: bool = False,
) -> SamplingPlan:
    """The :class:`SamplingPlan` of ``choice`` (:func:`kandinsky3.diffusion.registry.sampler_setup`): ``threshold``
    is the dynamic-thresholding percentile of x̂₀, ``scheduler_config`` a diffusers checkpoint's; the registry
    refuses what these weights or img2img cannot run."""
    function, timesteps, options = registry.sampler_setup(
        choice.sampler, choice.steps, eta=eta, threshold=threshold, scheduler_config=scheduler_config,
        flash_weights=flash_weights, img2img=img2img,
    )
    return SamplingPlan(function, timesteps, options, choice.w)
