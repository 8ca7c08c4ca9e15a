"""Image-to-image with the Kandinsky 3 base model (diffusers' ``Kandinsky3Img2ImgPipeline`` semantics,
docs/practice.md §6.6).

The image is encoded by the MoVQ (no scaling), noised to the first kept timestep with ``q_sample`` and denoised
over the last min(int(steps·strength), steps) timesteps. Unlike the diffusers port, images of any size work: they
are resized to a working size in multiples of the model's size multiple (diffusers rounds to 8 and then breaks in
the U-Net) and the results are resized back to the input's size; a (B, 4, h, w) latent may be passed as the image.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from ..diffusion import schedule
from .base import PipelineBase
from .checks import GenerationRequest
from .images import encode_images, pil_to_tensor, resize_images, to_output
from .stages import initial_noise

__all__ = ["Kandinsky3Img2ImgPipeline"]


class Kandinsky3Img2ImgPipeline(PipelineBase):
    """Img2img over the base model's components (see :class:`~kandinsky3.pipelines.base.PipelineBase`)."""

    task = "img2img"

    def __call__(
        self,
        prompt: str | Sequence[str],
        image: Image.Image | Sequence[Image.Image] | torch.Tensor,
        negative_prompt: str | Sequence[str] | None = None,
        **arguments: Any,
    ) -> Any:
        """Transform ``image`` following ``prompt``.

        Args:
            image: a PIL image (for every prompt), one PIL image per prompt, or MoVQ latents
                (N, 4, h, w) with N = 1 or the number of prompts.
            arguments (keywords; checked by :func:`~kandinsky3.pipelines.checks.check_generation`):
                strength: in (0, 1]; the share of the timestep list that is run (0.3 default).
                width, height: working size (multiples of the model's size multiple); default: the first
                    image's size floored to such multiples. The images come back at their input's size.
                and the options of :meth:`Kandinsky3Pipeline.__call__ <kandinsky3.pipelines.text_to_image.
                Kandinsky3Pipeline.__call__>` (``steps``, ``seed``, ``output_type``, ...); the sampler must be
                one img2img can run ("original", "ddpm", "ddim").
        """
        return self.generate(self.check(prompt=prompt, image=image, negative_prompt=negative_prompt, **arguments))

    def generate(self, request: GenerationRequest) -> Any:
        """Run a checked call (``pipe.check(...)`` or :func:`~kandinsky3.pipelines.checks.check_generation`)."""
        request = self._accept(request)
        with self.residency.phase("movq", self.movq):
            init = self._image_latents(request)  # (P, 4, h, w)
        init = init.repeat_interleave(request.batch.images_per_prompt, dim=0)  # (B, 4, h, w)
        conditions = self._encode(request.batch, request.plan)
        start_t = request.plan.timesteps[0]

        def start(indices: list[int], gen) -> torch.Tensor:
            x0 = init[indices]
            noise = initial_noise(tuple(x0.shape), gen, torch.device("cpu"))
            return schedule.q_sample(x0, noise, start_t, self.alphas_cumprod)

        latents = self._denoise(conditions, start, request)
        if request.output_type == "latent":
            return latents
        images = self._decode(latents, request.decode_slice_size)  # (B, 3, H, W) at the working size
        per_prompt = request.batch.images_per_prompt
        sizes = [request.output_sizes[i // per_prompt] for i in range(images.shape[0])] if request.output_sizes \
            else [(request.width, request.height)]
        if len(set(sizes)) == 1:
            return to_output(resize_images(images, sizes[0]), request.output_type)
        return [to_output(resize_images(images[i : i + 1], size), "pil")[0] for i, size in enumerate(sizes)]

    def _image_latents(self, request: GenerationRequest) -> torch.Tensor:
        """(P, 4, h, w) fp32 CPU latents of the input image(s), one per prompt."""
        if isinstance(request.image, torch.Tensor):
            latents = request.image.detach().float().cpu()
        else:
            pixels = torch.cat([pil_to_tensor(i, request.width, request.height) for i in request.image])
            latents = encode_images(self.movq, pixels)  # (N, 4, h, w)
        if latents.shape[0] == 1:
            return latents.expand(request.batch.num_prompts, -1, -1, -1)
        return latents
