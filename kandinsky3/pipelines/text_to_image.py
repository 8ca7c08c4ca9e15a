"""Text-to-image and Kandinsky Flash pipelines (docs/architecture.md §5.5–5.8, §6.2–6.3, §6.5).

``__call__`` runs named stages: validate → encode text → per mini-batch (start noise → denoise) → decode → output.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import UsageError, validating
from ..models.text_encoder import TextEncoder
from . import checks
from .base import PipelineBase
from .images import to_output
from .stages import SamplingPlan, initial_noise, make_generators, plan_sampling

__all__ = ["Kandinsky3Pipeline"]


class Kandinsky3Pipeline(PipelineBase):
    """Text-to-image with the Kandinsky 3 base model, or 4-step Kandinsky Flash (``flash=True``).

    Components and options as in :class:`~kandinsky3.pipelines.base.PipelineBase` (the U-Net has 4 input
    channels); ``flash``: Kandinsky Flash weights, 4 fixed steps, no guidance, no negative prompt.
    """

    def __init__(self, unet: torch.nn.Module, movq: torch.nn.Module, text_encoder: TextEncoder, *,
                 flash: bool = False, **options: Any):
        super().__init__(unet, movq, text_encoder, **options)
        self.flash = flash

    @property
    def default_sampler(self) -> str:
        return "flash" if self.flash else super().default_sampler

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        width: int | None = None,
        height: int | None = None,
        latents: torch.Tensor | None = None,
        decode_slice_size: int | None = 1,
        **options: Any,
    ) -> Any:
        """Generate images of ``prompt`` (a str or a list of them).

        Args:
            negative_prompt: one for all prompts or one per prompt (its own mask; not truncated).
            width, height: pixels, multiples of 64 (MoVQ factor × U-Net factor); default: the model's
                (``sampling_defaults``: 1024 for the released weights, 64 for the bundled tiny model).
            latents: (B, 4, height/8, width/8) start noise instead of drawing it.
            decode_slice_size: latents decoded at once (None: the whole batch).
            options: :class:`~kandinsky3.pipelines.checks.CallOptions` (``steps``, ``guidance_scale``, ``sampler``,
                ``seed``, ``num_images_per_prompt``, ``output_type``, ...).

        Returns:
            The images in ``output_type`` form, B = len(prompts) · num_images_per_prompt.
        """
        with validating():
            call = checks.CallOptions(**options)
            batch = checks.prompts_per_image(prompt, negative_prompt, call.num_images_per_prompt)
            shape = self._latent_shape(len(batch.prompts), width, height)
            checks.check_latents(latents, shape)
            plan = self._plan(call, negative_prompt)
            generators = make_generators(call.seed, call.generator, len(batch.prompts))
        conditions = self._encode(batch, plan)

        def start(indices: list[int], gen) -> torch.Tensor:
            if latents is not None:
                return latents[indices]
            return initial_noise((len(indices), *shape[1:]), gen, torch.device("cpu"))

        result = self._denoise(conditions, start, plan, generators, call)
        if call.output_type == "latent":
            return result
        return to_output(self._decode(result, decode_slice_size), call.output_type)

    def _latent_shape(self, count: int, width: int | None, height: int | None) -> tuple[int, int, int, int]:
        """(B, 4, height/8, width/8) for the requested size, else the model's; raises on sizes the networks
        cannot take."""
        width = self.sampling_defaults.width if width is None else width
        height = self.sampling_defaults.height if height is None else height
        checks.check_size(width, height, checks.size_multiple(self.unet, self.movq))
        factor = self.movq.config.downsample_factor
        return count, self.unet.config.out_channels, height // factor, width // factor

    def _plan(self, call: checks.CallOptions, negative_prompt, *, img2img: bool = False) -> SamplingPlan:
        """The base model's plan, or Flash's fixed one: Flash refuses what it would ignore."""
        if not self.flash:
            return super()._plan(call, negative_prompt, img2img=img2img)
        given = {
            "guidance_scale": call.guidance_scale, "negative_prompt": negative_prompt, "eta": call.eta,
            "steps": call.steps if call.steps not in (None, 4) else None,
            "sampler": call.sampler if call.sampler not in (None, "flash") else None,
        }
        refused = [name for name, value in given.items() if value is not None]
        if refused:
            raise UsageError(f"Kandinsky Flash runs 4 fixed steps without guidance; it does not take {refused}")
        choice = checks.SamplingChoice("flash", None, 0.0)
        return plan_sampling(choice, threshold=self.threshold_percentile, scheduler_config=self.scheduler_config,
                             flash_weights=True)
