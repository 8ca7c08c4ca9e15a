"""What every Kandinsky 3 pipeline holds, and the phases its components run in.

A pipeline owns no weights: the U-Net, MoVQ and text encoder come in already built (:mod:`kandinsky3.pipelines.load`
builds them from a checkpoint). Besides them it holds plain attributes: the conditioning style of the weights,
the model's :class:`~kandinsky3.components.SamplingDefaults`, a :class:`~kandinsky3.lowmem.residency.Residency`
(where each component waits between phases), and ``decode_tiling`` (None, or a
:class:`~kandinsky3.pipelines.images.DecodeTiling` for large images). Each pipeline's ``__call__`` validates its
inputs, prepares its start latents, and runs the three phases below, each component inside its residency phase.
"""

from __future__ import annotations

from typing import Any

import torch

from ..components import SamplingDefaults
from ..conditioning import TextConditions, check_style
from ..diffusion import registry, schedule
from ..lowmem.residency import Loader, Residency
from ..models.text_encoder import TextEncoder
from .checks import CallOptions, PromptBatch, choose_sampling
from .images import DecodeTiling, decode_latents
from .stages import SamplingPlan, Start, denoise, encode_text, plan_sampling

__all__ = ["PipelineBase"]


class PipelineBase:
    """The components of a pipeline and the phases they run in (subclassed by each pipeline, nothing else).

    Args:
        unet: ε-predicting :class:`~kandinsky3.models.UNet`.
        movq: :class:`~kandinsky3.models.MoVQ` (8× autoencoder).
        text_encoder: :class:`~kandinsky3.models.TextEncoder` (T5 + projection + null embedding).
        conditioning: "original" or "diffusers" semantics (:mod:`kandinsky3.conditioning`); the loader picks it
            from the checkpoint layout.
        scheduler_config: a diffusers ``scheduler_config.json`` dict, if the weights brought one; then "ddpm" (25
            steps, the config's spacing) is the default sampler, as in diffusers.
        offload: {"unet": device, "text_encoder": device, "movq": device}: every component waits on the CPU and
            visits its device only while it runs; None = components stay where they are.
        reload: {component: loader}: the component waits on the meta device, holding no memory, and ``loader()``
            reads it from disk each time its phase starts (:mod:`kandinsky3.lowmem.residency`; the loader's
            ``offload="disk"``).
        sampling_defaults: what the model renders with when a call does not say (size, and where recorded guidance,
            steps, sampler); None = the released models' (1024×1024, the pipeline's own guidance and sampler).
    """

    default_guidance_scale = 3.0  # w when neither the call nor the model says
    threshold_percentile = 0.99  # dynamic thresholding of x̂₀ (docs/architecture.md §5.4)

    def __init__(
        self,
        unet: torch.nn.Module,
        movq: torch.nn.Module,
        text_encoder: TextEncoder,
        *,
        conditioning: str = "original",
        scheduler_config: dict[str, Any] | None = None,
        offload: dict[str, Any] | None = None,
        reload: dict[str, Loader] | None = None,
        sampling_defaults: SamplingDefaults | None = None,
    ):
        check_style(conditioning)
        registry.check_scheduler_config(scheduler_config)
        self.unet, self.movq, self.text_encoder = unet, movq, text_encoder
        self.conditioning = conditioning
        self.scheduler_config = scheduler_config
        self.sampling_defaults = sampling_defaults or SamplingDefaults()
        self.residency = Residency(offload, reload)
        self.decode_tiling: DecodeTiling | None = None
        self.alphas_cumprod = schedule.cosine_alphas_cumprod()

    @property
    def default_sampler(self) -> str:
        """The sampler of a call that names none: the model's, else "ddpm" for weights that brought a diffusers
        scheduler config (as diffusers does), else Kandinsky's "original"."""
        return self.sampling_defaults.sampler or ("ddpm" if self.scheduler_config is not None else "original")

    def _plan(self, call: CallOptions, negative_prompt, *, img2img: bool = False) -> SamplingPlan:
        """The sampler run of a call: its choices, else the model's defaults, else the pipeline's."""
        choice = choose_sampling(call, negative_prompt, defaults=self.sampling_defaults,
                                 sampler_fallback=self.default_sampler, guidance_fallback=self.default_guidance_scale)
        return plan_sampling(choice, threshold=self.threshold_percentile, scheduler_config=self.scheduler_config,
                             eta=call.eta, img2img=img2img)

    def _encode(self, batch: PromptBatch, plan: SamplingPlan) -> TextConditions:
        """Text phase: the conditions of every image (no unconditional branch without guidance)."""
        with self.residency.phase("text_encoder", self.text_encoder):
            return encode_text(self.text_encoder, batch, style=self.conditioning, guided=plan.w != 0)

    def _denoise(self, conditions: TextConditions, start: Start, plan: SamplingPlan, generators, call: CallOptions,
                 extra_channels: torch.Tensor | None = None) -> torch.Tensor:
        """U-Net phase: :func:`~kandinsky3.pipelines.stages.denoise` → (B, 4, h, w) latents."""
        with self.residency.phase("unet", self.unet):
            return denoise(self.unet, conditions, start, plan, self.alphas_cumprod, generators=generators,
                           batch_size=call.bs, extra_channels=extra_channels, callback=call.callback,
                           progress=call.progress)

    def _decode(self, latents: torch.Tensor, slice_size: int | None = 1) -> torch.Tensor:
        """MoVQ phase: (B, 4, h, w) latents → (B, 3, 8h, 8w) fp32 CPU images in about [−1, 1]."""
        with self.residency.phase("movq", self.movq):
            return decode_latents(self.movq, latents, slice_size, self.decode_tiling)
