"""Inpainting with the 9-channel Kandinsky 3 U-Net (docs/architecture.md §2.9; docs/practice.md §6.4).

Mask convention at the API: **1 = repaint**, 0 = keep (the seed README's "Set 1 where image
should be masked").  Inside, the U-Net receives [x_t (4), keep-mask (1), masked-image latent (4)]
with keep = 1 − mask, as the original.

Beyond the original: the output has the input's size; by default the kept pixels are pasted
back from the input, so they are exactly unchanged; masks may be PIL images (0/1 or 0/255 PNGs),
0/1 or 0–255 arrays; bad masks (wrong size, not 2-D, nothing to repaint) are refused early; negative prompts work.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..conditioning import inpainting_channels
from ..errors import UsageError
from ..models.text_encoder import TextEncoder
from .base import PipelineBase
from .checks import GenerationRequest
from .images import pil_to_tensor, prepare_mask, resize_images, to_output, working_size
from .stages import initial_noise

__all__ = ["Kandinsky3InpaintingPipeline", "prepare_mask", "working_size"]


class Kandinsky3InpaintingPipeline(PipelineBase):
    """Inpainting: repaint the masked region of an image following a prompt.

    Components and options as in :class:`~kandinsky3.pipelines.base.PipelineBase`; the U-Net has 9 input channels.
    Defaults follow the original: "original" sampler, 50 steps, guidance 4.0, dynamic thresholding at the 0.95
    percentile.
    """

    task = "inpainting"
    default_guidance_scale = 4.0
    threshold_percentile = 0.95

    def __init__(self, unet: torch.nn.Module, movq: torch.nn.Module, text_encoder: TextEncoder, **options: Any):
        if unet.config.num_channels != 2 * movq.config.z_channels + 1:
            raise UsageError(
                f"inpainting needs a U-Net with {2 * movq.config.z_channels + 1} input channels "
                f"(x_t, keep-mask, masked latent), got {unet.config.num_channels}"
            )
        super().__init__(unet, movq, text_encoder, **options)

    def __call__(
        self,
        prompt: str | Sequence[str],
        image: Image.Image,
        mask: Any,
        negative_prompt: str | Sequence[str] | None = None,
        **arguments: Any,
    ) -> Any:
        """Repaint ``mask`` (H×W, 1 = repaint) of ``image`` (PIL) following ``prompt``.

        ``mask``: a 2-D array or tensor (bools, 0/1 or 0–255) or a PIL image (mode "1", or grey levels: a PNG
        of 0/1 values or of 0/255 values), the image's size (:func:`~kandinsky3.pipelines.images.prepare_mask`).
        Keyword ``arguments`` (checked by :func:`~kandinsky3.pipelines.checks.check_generation`):
        ``guidance_weight_text`` is the original's name for ``guidance_scale`` (default: the model's, else 4.0);
        ``paste_back`` (default True) copies the kept pixels from the input; and the options of
        :meth:`Kandinsky3Pipeline.__call__ <kandinsky3.pipelines.text_to_image.Kandinsky3Pipeline.__call__>`.
        Returns images of the input's size (``output_type`` "pil", "np" or "pt"; "latent" gives the working-size
        latents).
        """
        return self.generate(self.check(prompt=prompt, image=image, mask=mask, negative_prompt=negative_prompt,
                                        **arguments))

    def generate(self, request: GenerationRequest) -> Any:
        """Run a checked call (``pipe.check(...)`` or :func:`~kandinsky3.pipelines.checks.check_generation`)."""
        request = self._accept(request)
        image, width, height = request.image[0], request.width, request.height
        pixels = pil_to_tensor(image, width, height)  # (1, 3, H', W') in [-1, 1]
        repaint = self._resize_mask(request.mask, width, height)  # (1, 1, H', W')
        with self.residency.phase("movq", self.movq):
            extra = inpainting_channels(self.movq, pixels, repaint)  # (1, 5, h, w)
        extra = extra.expand(request.num_images, -1, -1, -1)
        conditions = self._encode(request.batch, request.plan)
        latent_shape = (self.movq.config.z_channels, *extra.shape[-2:])

        def start(indices: list[int], gen) -> torch.Tensor:
            return initial_noise((len(indices), *latent_shape), gen, torch.device("cpu"))

        latents = self._denoise(conditions, start, request, extra_channels=extra)
        if request.output_type == "latent":
            return latents
        generated = self._decode(latents, request.decode_slice_size)  # (B, 3, H', W') in [-1, 1]
        return to_output(self._finish(generated, image, request.mask, request.paste_back), request.output_type)

    @staticmethod
    def _resize_mask(mask: np.ndarray, width: int, height: int) -> torch.Tensor:
        """(H, W) repaint mask → (1, 1, height, width), bilinear without antialiasing (as the original)."""
        tensor = torch.from_numpy(mask)[None, None]
        if tensor.shape[-2:] == (height, width):
            return tensor
        return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)

    @staticmethod
    def _finish(generated: torch.Tensor, image: Image.Image, mask: np.ndarray, paste_back: bool) -> torch.Tensor:
        """Resize to the input size and, if asked, blend: mask·generated + (1 − mask)·input."""
        generated = resize_images(generated, image.size)
        if not paste_back:
            return generated
        original = pil_to_tensor(image, *image.size)  # (1, 3, H, W)
        alpha = torch.from_numpy(mask)[None, None]  # (1, 1, H, W), 1 = repaint
        return alpha * generated + (1 - alpha) * original
