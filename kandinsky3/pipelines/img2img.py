"""Image-to-image with the Kandinsky 3 base model (diffusers' ``Kandinsky3Img2ImgPipeline``
semantics, SPEC §6.6).

The image is encoded by the MoVQ (no scaling), noised to the first kept timestep with
``q_sample`` and denoised over the last min(int(steps·strength), steps) timesteps.  Unlike
the diffusers port, images of any size are resized to multiples of 64 (diffusers rounds to 8
and then breaks in the U-Net), and a (B, 4, h, w) latent may be passed as the image.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..diffusion import schedule
from . import common
from .text_to_image import Kandinsky3Pipeline

__all__ = ["Kandinsky3Img2ImgPipeline"]


class Kandinsky3Img2ImgPipeline(Kandinsky3Pipeline):
    """Img2img over the same components as text-to-image (see :class:`Kandinsky3Pipeline`)."""

    def __call__(
        self,
        prompt: str | Sequence[str],
        image: Image.Image | Sequence[Image.Image] | torch.Tensor,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        strength: float = 0.3,
        num_images_per_prompt: int = 1,
        bs: int | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        output_type: str = "pil",
    ) -> Any:
        """Transform ``image`` following ``prompt``.

        Args:
            image: a PIL image (for every prompt), one PIL image per prompt, or MoVQ latents
                (N, 4, h, w) with N = 1 or the number of prompts.
            strength: in (0, 1]; the share of the timestep list that is run (0.3 default).
            width, height: working size (multiples of 64); default: the image's size floored
                to multiples of 64.
            Other arguments as in :meth:`Kandinsky3Pipeline.__call__`.
        """
        if self.flash:
            raise ValueError("img2img is not defined for Kandinsky Flash weights")
        prompt_list = common.as_prompt_list(prompt)
        prompts = common.repeat_prompts(prompt_list, num_images_per_prompt)
        negatives = common.expand_negatives(negative_prompt, len(prompt_list), num_images_per_prompt)
        common.check_output_type(output_type)
        sampler, w = self._check_sampling(sampler, steps, guidance_scale, negative_prompt, eta)
        sample_fn, timesteps, kwargs = common.sampler_setup(
            sampler, steps, eta=eta, threshold=self.threshold_percentile, scheduler_config=self.scheduler_config
        )
        if sampler.startswith("dpmpp") or sampler == "original30":
            raise ValueError("img2img supports the 'original', 'ddpm' and 'ddim' samplers "
                             f"({sampler!r} derives its noise levels from its whole timestep list)")
        timesteps = schedule.img2img_timesteps(timesteps, strength)
        with self.phase("movq"):
            init = self._image_latents(image, len(prompt_list), width, height)  # (P, 4, h, w)
        init = init.repeat_interleave(num_images_per_prompt, dim=0)  # (B, 4, h, w)
        generators = common.make_generators(seed, generator, len(prompts))
        with self.phase("text_encoder"):
            conditions = common.encode_text(
                self.text_encoder, prompts, negatives, conditioning=self.conditioning, guided=w != 0
            )
        start_t = timesteps[0]

        def start(indices: list[int], gen) -> torch.Tensor:
            x0 = init[indices]
            noise = common.initial_noise(tuple(x0.shape), gen, torch.device("cpu"))
            return schedule.q_sample(x0, noise, start_t, self.alphas_cumprod)

        with self.phase("unet"):
            latents = common.denoise(
                self.unet, conditions, start, sample_fn=sample_fn, timesteps=timesteps,
                alphas_cumprod=self.alphas_cumprod, w=w, generators=generators, batch_size=bs,
                sampler_kwargs=kwargs, callback=callback, progress=progress,
            )
        if output_type == "latent":
            return latents
        with self.phase("movq"):
            images = common.decode_latents(self.movq, latents, tiling=self.decode_tiling)
        return common.to_output(images, output_type)

    def _image_latents(self, image, num_prompts: int, width: int | None, height: int | None) -> torch.Tensor:
        """(P, 4, h, w) fp32 CPU latents of the input image(s), one per prompt."""
        multiple = common.size_multiple(self.unet, self.movq)
        if isinstance(image, torch.Tensor):
            latents = image.detach().float().cpu()
            channels = self.movq.config.z_channels
            if latents.ndim != 4 or latents.shape[1] != channels:
                raise ValueError(f"a tensor image must be MoVQ latents (N, {channels}, h, w), got {tuple(latents.shape)}")
            factor = self.movq.config.downsample_factor
            common.check_size(latents.shape[-1] * factor, latents.shape[-2] * factor, multiple)
            return _per_prompt(latents, num_prompts)
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images or not all(isinstance(i, Image.Image) for i in images):
            raise TypeError("image must be a PIL image, a list of PIL images or a latent tensor")
        if width is None or height is None:
            first = images[0].size
            width = width or max(multiple, first[0] // multiple * multiple)
            height = height or max(multiple, first[1] // multiple * multiple)
        common.check_size(width, height, multiple)
        pixels = torch.cat([common.pil_to_tensor(i, width, height) for i in images])  # (N, 3, H, W)
        return _per_prompt(common.encode_images(self.movq, pixels), num_prompts)


def _per_prompt(latents: torch.Tensor, num_prompts: int) -> torch.Tensor:
    if latents.shape[0] == num_prompts:
        return latents
    if latents.shape[0] == 1:
        return latents.expand(num_prompts, -1, -1, -1)
    raise ValueError(f"got {latents.shape[0]} images for {num_prompts} prompts; pass one, or one per prompt")
