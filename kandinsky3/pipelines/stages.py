"""The stages every pipeline runs, as plain functions: encode the text and denoise — with the randomness (one
generator per image), the mini-batches and the U-Net bound to each batch's text they need. The sampler run
(``plan``) comes from :mod:`kandinsky3.pipelines.sampling`.

    conditions = encode_text(text_encoder, batch, style="original", guided=True)
    plan = plan_sampling(SamplingChoice("original", 50, 3.0), threshold=0.99, scheduler_config=None)
    latents = denoise(unet, conditions, start, plan, alphas_cumprod, generators=make_generators(0, None, B))

Sampling stops with :class:`~kandinsky3.errors.NonFiniteError`, naming the step, as soon as the latents or x̂₀
hold NaN or infinity (float16 overflow, broken weights) instead of decoding them into a black image.

The conditioning rules themselves (both styles, the pad-slot rule) live in :mod:`kandinsky3.conditioning`, the
samplers' rules in :mod:`kandinsky3.diffusion.registry`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..conditioning import TextConditions, encode_prompts, gather_conditions, pool_as_alone
from ..diffusion import guidance
from ..errors import NonFiniteError
from ..lowmem.memory import return_free_memory
from ..lowmem.storage import compute_dtype
from ..models.text_encoder import TextEncoder
from ..models.unet import UNet
from .checks import PromptBatch
from .sampling import SamplingPlan

__all__ = [
    "MODULATION_TABLE_LIMIT", "batch_slices", "check_finite", "denoise", "encode_text", "initial_noise",
    "make_generators", "network_binder",
]

MODULATION_TABLE_LIMIT = 2**30  # bytes; larger batches × step counts compute the norms' inputs at every call
Start = Callable[[list[int], Any], torch.Tensor]  # (image indices, their generator(s)) -> (b, 4, h, w) start latents


def encode_text(text_encoder: TextEncoder, batch: PromptBatch, *, style: str, guided: bool) -> TextConditions:
    """The text stage: :func:`~kandinsky3.conditioning.encode_prompts` of the batch's prompts (and negatives) in
    ``style``, without autograd; then the (streamed) T5's transient buffers are handed back to the system."""
    with torch.inference_mode():
        conditions = encode_prompts(text_encoder, batch.prompts, batch.negatives, style=style, guided=guided)
    return_free_memory()
    return conditions


def make_generators(
    seed: int | None, generator: torch.Generator | Sequence[torch.Generator] | None, count: int
) -> torch.Generator | list[torch.Generator]:
    """The randomness of one call of ``count`` images (checked by
    :func:`~kandinsky3.pipelines.checks.check_generation`: exactly one of ``seed`` and ``generator``).

    ``seed`` gives image i its own CPU generator seeded ``seed + i``, so a batch of prompts gives the same images as
    the prompts one by one, and the same seed gives the same image on every device. A caller's generator (or list
    of ``count`` generators) is used as given.
    """
    if generator is not None:
        return list(generator) if isinstance(generator, (list, tuple)) else generator
    return [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(count)]


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator], device: torch.device
) -> torch.Tensor:
    """z ~ N(0, I) fp32 of ``shape``, drawn on the generator's device (per sample for a list)."""
    if isinstance(generator, list):
        return torch.cat([initial_noise((1, *shape[1:]), g, device) for g in generator])
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def batch_slices(total: int, batch_size: int | None) -> list[slice]:
    """Mini-batches of at most ``batch_size`` images (None = one batch)."""
    size = batch_size or total
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def network_binder(unet: torch.nn.Module, timesteps: Sequence[int]) -> guidance.Bind:
    """``bind(context, mask)`` → network ``(x, t) -> ε`` for a sampling run over ``timesteps``: inputs go to the
    U-Net's device and dtype, ε comes back in the latents' dtype and device.

    A :class:`~kandinsky3.models.unet.UNet` binds the text itself (:meth:`UNet.bind`: the conditional norms' inputs
    for all ``timesteps`` precomputed, while that table stays under ``MODULATION_TABLE_LIMIT``); any other network
    ``(x, t, context, mask) -> ε`` (a stand-in in tests, another implementation) gets the text at every call.
    """
    device, dtype = next(unet.parameters()).device, compute_dtype(unet)

    def bind(context: torch.Tensor, mask: torch.Tensor) -> guidance.Network:
        context, mask = context.to(device, dtype), mask.to(device)
        if isinstance(unet, UNet):
            network = unet.bind(context, mask, timesteps, max_table_bytes=MODULATION_TABLE_LIMIT)
        else:
            network = guidance.bind_per_call(unet)(context, mask)
        return lambda x, t: network(x.to(device, dtype), t.to(device)).to(x.device, x.dtype)

    return bind


def denoise(
    unet: torch.nn.Module,
    conditions: TextConditions,
    start: Start,
    plan: SamplingPlan,
    alphas_cumprod: torch.Tensor,
    *,
    generators: torch.Generator | list[torch.Generator],
    batch_size: int | None = None,
    extra_channels: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run ``plan`` over mini-batches of at most ``batch_size`` images → (B, 4, h, w) latents.

    The latents and the sampler's arithmetic are fp32 whatever the U-Net's dtype (fp64 for an fp64 U-Net, which the
    exactness tests use). ``start(indices, generator)`` returns the start latents of those images (noise for
    text-to-image, noised image latents for img2img). ``extra_channels`` (B, C, h, w) is concatenated to x_t at
    every call (inpainting's keep-mask and masked latent).

    Each image's pooled text vector is the one it has alone (:func:`~kandinsky3.conditioning.pool_as_alone`), so
    a batch of prompts gives the images of the prompts one by one. The U-Net is bound to each mini-batch's text
    once (:func:`network_binder`).
    """
    device = next(unet.parameters()).device
    latent_dtype = torch.promote_types(torch.float32, compute_dtype(unet))  # fp32, or fp64
    conditions = pool_as_alone(conditions.to(device))
    bind = network_binder(unet, plan.timesteps)
    bar = None
    if progress:
        bar = lambda steps: tqdm(steps, total=len(plan.timesteps), desc="denoising", leave=False)  # noqa: E731
    results = []
    for part in batch_slices(conditions.cond[0].shape[0], batch_size):
        indices = list(range(part.start, part.stop))
        generator = [generators[i] for i in indices] if isinstance(generators, list) else generators
        text = gather_conditions(conditions, part)
        extra = None if extra_channels is None else extra_channels[part].to(device)
        with torch.inference_mode():
            denoiser = guidance.make_cfg_denoiser(bind, text.cond, text.uncond, plan.w, extra_channels=extra)
            x = start(indices, generator).to(device, latent_dtype)
            watch = check_finite(callback, len(plan.timesteps), compute_dtype(unet))
            x = plan.function(denoiser, x, plan.timesteps, alphas_cumprod, generator=generator, callback=watch,
                              progress=bar, **plan.options)
            _require_finite(x, "the end of the last step", compute_dtype(unet))
            results.append(x)
    return_free_memory()
    return torch.cat(results)


def check_finite(callback: Callable[[dict], None] | None, steps: int, dtype: torch.dtype) -> Callable[[dict], None]:
    """The sampler callback of a run of ``steps`` steps whose U-Net computes in ``dtype``: raises NonFiniteError
    naming the step as soon as its x_t or x̂₀ holds NaN or infinity (one reduction each per step), else calls
    ``callback``."""

    def watch(info: dict) -> None:
        for name in ("x", "x0"):
            _require_finite(info[name], f"step {info['step'] + 1} of {steps} (t={info['t']})", dtype)
        if callback is not None:
            callback(info)

    return watch


def _require_finite(latents: torch.Tensor, where: str, dtype: torch.dtype) -> None:
    if torch.isfinite(latents).all():
        return
    if dtype == torch.float16:
        advice = ("the U-Net computes in float16, which overflows here: load it in bf16 or fp32 "
                  "(LoadOptions(dtype='bf16'), CLI --dtype bf16)")
    else:
        advice = (f"the U-Net computes in {str(dtype).removeprefix('torch.')}: compute in fp32 "
                  "(LoadOptions(compute_dtype='fp32'), CLI --compute-dtype fp32) or check the weights for NaN/inf")
    raise NonFiniteError(f"sampling produced NaN or infinite latents at {where}; {advice}")
