"""Text-to-image and Kandinsky Flash pipelines (docs/architecture.md §5.5–5.8; docs/practice.md §6.2–6.3, §6.5).

``__call__`` checks the call (:func:`~kandinsky3.pipelines.checks.check_generation`), then ``generate`` runs named
stages: encode text → per mini-batch (start noise → denoise) → decode → output.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..models.text_encoder import TextEncoder
from .base import PipelineBase
from .checks import GenerationRequest
from .images import to_output
from .stages import initial_noise

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
    def task(self) -> str:
        return "flash" if self.flash else "text-to-image"

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 **arguments: Any) -> Any:
        """Generate images of ``prompt`` (a str or a list of them).

        Args:
            negative_prompt: one for all prompts or one per prompt (its own mask; not truncated).
            arguments (keywords; checked by :func:`~kandinsky3.pipelines.checks.check_generation`):
                width, height: pixels, positive multiples of the model's size multiple (MoVQ factor × U-Net
                    factor: 64 for the released weights and the bundled tiny model); default: the model's
                    (``sampling_defaults``: 1024 for the released weights, 128 for the bundled model).
                latents: (B, 4, height/8, width/8) finite start noise instead of drawing it.
                decode_slice_size: latents decoded at once (None: the whole batch; default 1).
                num_images_per_prompt (alias ``images_num``): images per prompt.
                bs: images per U-Net batch (the guided batch is twice that); None: all at once.
                steps (alias ``num_inference_steps``): sampler steps; None: the model's (with its sampler), else
                    the sampler's own (50 for "original", 25 for "ddpm", "dpmpp_2m", "dpmpp_2m_sde").
                guidance_scale: w in ε = (w+1)·ε_cond − w·ε_uncond, finite, >= 0; None: the model's, else 3.0;
                    0 disables guidance.
                sampler: "original", "original30", "ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde" ("flash" for the
                    Flash weights); None: the model's, else ``default_sampler``.
                eta: noise of the "original" (default 1) and "ddim" (default 0) samplers, finite, >= 0.
                seed: an int in [0, 2**63 − 1]: image i gets a CPU generator seeded seed + i; or ``generator``
                    (one, or one per image). Neither: a random seed, logged.
                callback: called at each step with {"step", "t", "x", "x0"} (observe only).
                progress: show a progress bar over the denoising steps (default True).
                output_type: "pil" (a list of PIL images, the default), "np" ((B,H,W,3) in [0,1]), "pt"
                    ((B,3,H,W) in [0,1]) or "latent" ((B,4,h,w)).

        Returns:
            The images in ``output_type`` form, B = len(prompts) · num_images_per_prompt.
        """
        return self.generate(self.check(prompt=prompt, negative_prompt=negative_prompt, **arguments))

    def generate(self, request: GenerationRequest) -> Any:
        """Run a checked call (``pipe.check(...)`` or :func:`~kandinsky3.pipelines.checks.check_generation`)."""
        request = self._accept(request)
        conditions = self._encode(request.batch, request.plan)
        f = self.movq.config.downsample_factor
        shape = (self.unet.config.out_channels, request.height // f, request.width // f)

        def start(indices: list[int], gen) -> torch.Tensor:
            if request.latents is not None:
                return request.latents[indices]
            return initial_noise((len(indices), *shape), gen, torch.device("cpu"))

        latents = self._denoise(conditions, start, request)
        if request.output_type == "latent":
            return latents
        return to_output(self._decode(latents, request.decode_slice_size), request.output_type)
