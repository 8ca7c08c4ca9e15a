"""Image-to-image with the Kandinsky 3 base model (diffusers' ``Kandinsky3Img2ImgPipeline`` semantics,
docs/architecture.md §6.6).

The image is encoded by the MoVQ (no scaling), noised to the first kept timestep with ``q_sample`` and denoised
over the last min(int(steps·strength), steps) timesteps. Unlike the diffusers port, images of any size are resized
to multiples of 64 (diffusers rounds to 8 and then breaks in the U-Net), and a (B, 4, h, w) latent may be passed
as the image.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from PIL import Image

from ..diffusion import schedule
from ..errors import UsageError, validating
from . import checks
from .base import PipelineBase
from .images import encode_images, pil_to_tensor, to_output
from .stages import initial_noise, make_generators

__all__ = ["Kandinsky3Img2ImgPipeline"]


class Kandinsky3Img2ImgPipeline(PipelineBase):
    """Img2img over the base model's components (see :class:`~kandinsky3.pipelines.base.PipelineBase`)."""

    def __call__(
        self,
        prompt: str | Sequence[str],
        image: Image.Image | Sequence[Image.Image] | torch.Tensor,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        strength: float = 0.3,
        width: int | None = None,
        height: int | None = None,
        **options: Any,
    ) -> Any:
        """Transform ``image`` following ``prompt``.

        Args:
            image: a PIL image (for every prompt), one PIL image per prompt, or MoVQ latents
                (N, 4, h, w) with N = 1 or the number of prompts.
            strength: in (0, 1]; the share of the timestep list that is run (0.3 default).
            width, height: working size (multiples of 64); default: the image's size floored
                to multiples of 64.
            options: :class:`~kandinsky3.pipelines.checks.CallOptions`; the sampler must be one img2img can run
                ("original", "ddpm", "ddim").
        """
        with validating():
            call = checks.CallOptions(**options)
            batch = checks.prompts_per_image(prompt, negative_prompt, call.num_images_per_prompt)
            plan = self._plan(call, negative_prompt, img2img=True)
            plan = dataclasses.replace(plan, timesteps=schedule.img2img_timesteps(plan.timesteps, strength))
            generators = make_generators(call.seed, call.generator, len(batch.prompts))
        with self.residency.phase("movq", self.movq):
            init = self._image_latents(image, batch.num_prompts, width, height)  # (P, 4, h, w)
        init = init.repeat_interleave(batch.images_per_prompt, dim=0)  # (B, 4, h, w)
        conditions = self._encode(batch, plan)
        start_t = plan.timesteps[0]

        def start(indices: list[int], gen) -> torch.Tensor:
            x0 = init[indices]
            noise = initial_noise(tuple(x0.shape), gen, torch.device("cpu"))
            return schedule.q_sample(x0, noise, start_t, self.alphas_cumprod)

        latents = self._denoise(conditions, start, plan, generators, call)
        return latents if call.output_type == "latent" else to_output(self._decode(latents), call.output_type)

    def _image_latents(self, image, num_prompts: int, width: int | None, height: int | None) -> torch.Tensor:
        """(P, 4, h, w) fp32 CPU latents of the input image(s), one per prompt."""
        multiple = checks.size_multiple(self.unet, self.movq)
        if isinstance(image, torch.Tensor):
            latents = image.detach().float().cpu()
            channels = self.movq.config.z_channels
            if latents.ndim != 4 or latents.shape[1] != channels:
                raise UsageError(f"a tensor image must be MoVQ latents (N, {channels}, h, w), "
                                 f"got {tuple(latents.shape)}")
            factor = self.movq.config.downsample_factor
            checks.check_size(latents.shape[-1] * factor, latents.shape[-2] * factor, multiple)
            return _per_prompt(latents, num_prompts)
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images or not all(isinstance(i, Image.Image) for i in images):
            raise TypeError("image must be a PIL image, a list of PIL images or a latent tensor")
        if width is None or height is None:
            first = images[0].size
            width = width or max(multiple, first[0] // multiple * multiple)
            height = height or max(multiple, first[1] // multiple * multiple)
        checks.check_size(width, height, multiple)
        pixels = torch.cat([pil_to_tensor(i, width, height) for i in images])  # (N, 3, H, W)
        return _per_prompt(encode_images(self.movq, pixels), num_prompts)


def _per_prompt(latents: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """(N, 4, h, w) with N = 1 or ``num_prompts`` → (num_prompts, 4, h, w)."""
    if latents.shape[0] == num_prompts:
        return latents
    if latents.shape[0] == 1:
        return latents.expand(num_prompts, -1, -1, -1)
    raise UsageError(f"got {latents.shape[0]} images for {num_prompts} prompts; pass one, or one per prompt")
