"""The denoiser contract, classifier-free guidance and x̂₀ transforms (docs/architecture.md §5.3, §5.4).

Denoiser contract
-----------------
Every sampler calls exactly one thing: a ``Denoiser``, ``denoiser(x_t, t) -> ε̂`` with
``x_t`` (B, C, H, W) latents, ``t`` (B,) long integer timesteps in [0, 999], and ε̂ of the same shape as x_t.
The text conditioning (and, for inpainting, the keep-mask and masked latent) is already bound inside it.

Classifier-free guidance is a wrapper that builds such a denoiser from a ``Bind``: ``bind(context, mask)``
returns the ``Network`` ``(x, t) -> ε`` for that text, with x (N, C_in, H, W), t (N,) long, context (N, L, D)
and mask (N, L) (1/True = real token). The wrapper stacks [cond; uncond] along the batch (cond FIRST, the
original Kandinsky order), binds the stacked text once, and at every step makes one network call, splits the
halves and combines them with ``guided_eps``. The sampler never knows. Binding once per sampling run lets the
network precompute what depends only on the text (the U-Net's :meth:`~kandinsky3.models.unet.UNet.bind`); a
network that takes the text at every call, ``net_call(x, t, context, mask)`` as k-diffusion's inner models do,
becomes a ``Bind`` through :func:`bind_per_call`.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t (B, C, H, W), t (B,) long) -> ε̂ (B, C, H, W), conditioning already bound."""

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x (N, C_in, H, W), t (N,) long) -> ε (N, C, H, W): one network evaluation, its text already bound."""

Bind = Callable[[torch.Tensor, torch.Tensor], Network]
"""(context (N, L, D), mask (N, L)) -> the ``Network`` for that text."""

NetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x (N, C_in, H, W), t (N,) long, context (N, L, D), mask (N, L)) -> ε (N, C, H, W): a network taking its text
at every call (the U-Net's ``forward``)."""

Condition = tuple[torch.Tensor, torch.Tensor]
"""(context (B, L, D), mask (B, L)) with mask 1/True = real token."""


def bind_per_call(net_call: NetCall) -> Bind:
    """The ``Bind`` of a network that takes its text at every call: nothing is precomputed."""

    def bind(context: torch.Tensor, mask: torch.Tensor) -> Network:
        return lambda x, t: net_call(x, t, context, mask)

    return bind


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Kandinsky CFG: ε̂ = (w + 1)·ε_cond − w·ε_uncond = ε_uncond + (w + 1)·(ε_cond − ε_uncond) (architecture §5.3).

    ``w`` is the "standard CFG scale minus 1": w = 0 is the conditional prediction alone and w = 3 (the T2I
    default, ``guidance_scale`` in both codebases) equals a standard scale of 4. Inpainting uses w = 4.
    """
    return (w + 1.0) * eps_cond - w * eps_uncond


def make_cfg_denoiser(
    bind: Bind,
    cond: Condition,
    uncond: Condition | None,
    w: float,
    *,
    extra_channels: torch.Tensor | None = None,
) -> Denoiser:
    """Bind conditioning and CFG around a network and return a ``Denoiser``.

    Args:
        bind: ``bind(context, mask)`` returns the network ``(x, t) -> ε`` for that text (see ``Bind``); it is
            called once, here, with the stacked text.
        cond: (context (B, L, D), mask (B, L)) of the prompt.
        uncond: (context, mask) of the unconditional branch (null embedding or negative prompt), same shapes
            as ``cond``; may be None only when w == 0.
        w: guidance weight, "standard scale minus 1" (see ``guided_eps``).
        extra_channels: optional (B, C_extra, H, W) tensor concatenated to x_t along channels before every call
            (inpainting: keep-mask ‖ masked latent, giving the 9-channel input); identical for both branches.

    The returned denoiser makes exactly one network call per evaluation: with batch B when w == 0 (no
    doubling; the unconditional branch is never run), otherwise with batch 2B on [cond; uncond], cond first.
    Note that diffusers runs CFG only when w > 1; a pipeline that wants that behaviour passes w = 0 then.
    """
    context, mask = cond
    if context.ndim != 3 or mask.shape != context.shape[:2]:
        raise ValueError(f"cond must be (context (B,L,D), mask (B,L)), got {tuple(context.shape)}, {tuple(mask.shape)}")
    batch = context.shape[0]
    if extra_channels is not None and (extra_channels.ndim != 4 or extra_channels.shape[0] != batch):
        raise ValueError(f"extra_channels must be (B={batch}, C, H, W), got {tuple(extra_channels.shape)}")

    if w != 0:
        if uncond is None:
            raise ValueError(f"w={w} needs an unconditional (context, mask); pass uncond or use w=0")
        u_context, u_mask = uncond
        if u_context.shape != context.shape or u_mask.shape != mask.shape:
            raise ValueError(
                f"uncond shapes {tuple(u_context.shape)}, {tuple(u_mask.shape)} must equal cond shapes "
                f"{tuple(context.shape)}, {tuple(mask.shape)} (pad both to the same length L first)"
            )
        context = torch.cat([context, u_context])  # (2B, L, D): [cond; uncond], stacked once per run
        mask = torch.cat([mask, u_mask])  # (2B, L)
        if extra_channels is not None:
            extra_channels = torch.cat([extra_channels, extra_channels])  # (2B, C_extra, H, W)

    network = bind(context, mask)

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != batch or t.shape != (batch,):
            raise ValueError(f"expected x (B={batch}, C, H, W) and t (B,), got {tuple(x.shape)}, {tuple(t.shape)}")
        x_in, t_in = (x, t) if w == 0 else (torch.cat([x, x]), torch.cat([t, t]))  # (B or 2B, C, H, W), (B or 2B,)
        if extra_channels is not None:
            x_in = torch.cat([x_in, extra_channels], dim=1)  # (B or 2B, C+C_extra, H, W)
        eps = network(x_in, t_in)
        return eps if w == 0 else guided_eps(*eps.chunk(2), w)  # [cond; uncond] halves, (B, C, H, W) each

    return denoiser


def make_denoiser(bind: Bind, cond: Condition, *, extra_channels: torch.Tensor | None = None) -> Denoiser:
    """A conditional-only ``Denoiser`` (no CFG, one call with batch B), e.g. for Kandinsky Flash (architecture §5.7)."""
    return make_cfg_denoiser(bind, cond, None, 0.0, extra_channels=extra_channels)


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Kandinsky dynamic thresholding of (B, …) x̂₀, per sample (architecture §5.4; Saharia et al. 2022, §2.3).

    q = quantile(|x̂₀| over all of the sample's elements, percentile) (linear interpolation, as
    ``torch.quantile``); q ← max(q, 1); x̂₀ ← clip(x̂₀, −q, q)/q. The output lies in [−1, 1], and a sample
    whose q ≤ 1 is only hard-clipped to [−1, 1] (unchanged if already inside). The quantile is computed in
    fp32 (``torch.quantile`` rejects half types). Kandinsky uses percentile 0.99 (T2I) and 0.95 (inpainting).
    """
    if not 0.0 <= percentile <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {percentile}")
    flat = x0.detach().abs().flatten(1).float()  # (B, N)
    q = torch.quantile(flat, percentile, dim=1).clamp(min=1.0)  # (B,)
    q = q.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    return torch.maximum(torch.minimum(x0, q), -q) / q


def hard_clip(x0: torch.Tensor, limit: float = 1.0) -> torch.Tensor:
    """clip(x̂₀, −limit, limit): the original's behaviour without a percentile and diffusers' ``clip_sample``."""
    return x0.clamp(-limit, limit)
