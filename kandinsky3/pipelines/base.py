"""What every Kandinsky 3 pipeline holds, and the phases its components run in.

A pipeline owns no weights: the U-Net, MoVQ and text encoder come in already built (:mod:`kandinsky3.pipelines.load`
builds them from a checkpoint). Besides them it holds plain attributes: the conditioning style of the weights,
the model's :class:`~kandinsky3.components.SamplingDefaults`, a :class:`~kandinsky3.lowmem.residency.Residency`
(where each component waits between phases), and ``decode_tiling`` (None, or a
:class:`~kandinsky3.pipelines.images.DecodeTiling` for large images). Each pipeline's ``__call__`` validates its
inputs (:func:`~kandinsky3.pipelines.checks.check_generation`, also :meth:`PipelineBase.check`), and its
``generate(request)`` prepares the start latents and runs the three phases below, each component inside its
residency phase.
"""

from __future__ import annotations

from typing import Any

import torch

from ..components import SamplingDefaults
from ..conditioning import TextConditions, check_style
from ..diffusion import registry, schedule
from ..errors import UsageError
from ..lowmem.residency import Loader, Residency
from ..models.text_encoder import TextEncoder
from .checks import GenerationRequest, ModelFacts, PromptBatch, check_generation, default_sampler
from .images import DecodeTiling, decode_latents
from .sampling import SamplingPlan
from .stages import Start, denoise, encode_text, make_generators

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

    task: str  # "text-to-image", "flash", "img2img" or "inpainting": what check_generation checks calls as
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
        self.devices: dict[str, torch.device] | None = None  # where each component computes (set by the loader)
        self.alphas_cumprod = schedule.cosine_alphas_cumprod()

    @property
    def default_sampler(self) -> str:
        """The sampler of a call that names none: the model's, else "ddpm" for weights that brought a diffusers
        scheduler config (as diffusers does), else Kandinsky's "original"."""
        return default_sampler(self.task, self.sampling_defaults, self.scheduler_config)

    def check(self, **arguments: Any) -> GenerationRequest:
        """:func:`~kandinsky3.pipelines.checks.check_generation` of a call with these keyword ``arguments``: what
        ``__call__`` runs first; ``generate(request)`` then runs the checked call."""
        return check_generation(self.task, ModelFacts.of_pipeline(self), **arguments)

    def _accept(self, request: GenerationRequest) -> GenerationRequest:
        if not isinstance(request, GenerationRequest) or request.task != self.task:
            raise UsageError(f"generate() takes a GenerationRequest checked for {self.task!r} (pipe.check(...))")
        return request

    # LoRA adapters (kandinsky3.lora): several at once, each with its own scale; fuse_lora merges them for speed.
    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Load a LoRA file (made for this base model) as adapter ``name`` (default: the file name); returns it."""
        from .. import lora

        if self.residency.reload.keys() & {"unet", "text_encoder"}:
            raise UsageError("LoRA needs the U-Net and text encoder in memory: load without offload='disk'")
        return lora.load_lora(self.unet, self.text_encoder, path, scale=scale, name=name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        from .. import lora

        lora.set_lora_scale(self.unet, self.text_encoder, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove adapter ``name``, or all of them."""
        from .. import lora

        lora.unload_lora(self.unet, self.text_encoder, name)

    def fuse_lora(self) -> None:
        """Merge the loaded adapters into the weights (faster calls); :meth:`unfuse_lora` restores them exactly."""
        from .. import lora

        lora.fuse_lora(self.unet, self.text_encoder)

    def unfuse_lora(self) -> None:
        from .. import lora

        lora.unfuse_lora(self.unet, self.text_encoder)

    def _encode(self, batch: PromptBatch, plan: SamplingPlan) -> TextConditions:
        """Text phase: the conditions of every image (no unconditional branch without guidance)."""
        with self.residency.phase("text_encoder", self.text_encoder):
            return encode_text(self.text_encoder, batch, style=self.conditioning, guided=plan.w != 0)

    def _denoise(self, conditions: TextConditions, start: Start, request: GenerationRequest,
                 extra_channels: torch.Tensor | None = None) -> torch.Tensor:
        """U-Net phase: :func:`~kandinsky3.pipelines.stages.denoise` → (B, 4, h, w) latents."""
        generators = make_generators(request.seed, request.generator, request.num_images)
        with self.residency.phase("unet", self.unet):
            return denoise(self.unet, conditions, start, request.plan, self.alphas_cumprod, generators=generators,
                           batch_size=request.bs, extra_channels=extra_channels, callback=request.callback,
                           progress=request.progress)

    def _decode(self, latents: torch.Tensor, slice_size: int | None = 1) -> torch.Tensor:
        """MoVQ phase: (B, 4, h, w) latents → (B, 3, 8h, 8w) fp32 CPU images in about [−1, 1]."""
        with self.residency.phase("movq", self.movq):
            return decode_latents(self.movq, latents, slice_size, self.decode_tiling)
