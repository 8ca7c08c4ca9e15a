"""Inpainting with the 9-channel Kandinsky 3 U-Net (docs/architecture.md §2.9, §6.4).

Mask convention at the API: **1 = repaint**, 0 = keep (the seed README's "Set 1 where image
should be masked").  Inside, the U-Net receives [x_t (4), keep-mask (1), masked-image latent (4)]
with keep = 1 − mask, as the original.

Beyond the original: the output has the input's size; by default the kept pixels are pasted
back from the input, so they are exactly unchanged; masks may be PIL images or 0–255 arrays;
bad masks (wrong size, not 2-D, nothing to repaint) are refused early; negative prompts work.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..conditioning import inpainting_channels
from ..errors import UsageError, validating
from ..models.text_encoder import TextEncoder
from . import checks
from .base import PipelineBase
from .images import pil_to_tensor, to_output
from .stages import initial_noise, make_generators

__all__ = ["Kandinsky3InpaintingPipeline", "prepare_mask", "working_size"]

MAX_PIXELS = 1024 * 1024  # the original caps the working size at about 1 MP (never upscales)


def working_size(width: int, height: int, multiple: int = 64) -> tuple[int, int]:
    """The original's working size: scale down to at most ~1 MP, then floor each side to ``multiple``."""
    reduce = max(1.0, math.sqrt(width * height / MAX_PIXELS))
    new_w = int(round(width / reduce)) // multiple * multiple
    new_h = int(round(height / reduce)) // multiple * multiple
    if new_w == 0 or new_h == 0:
        raise UsageError(f"the image ({width}x{height}) is too small; both sides must be at least {multiple}")
    return new_w, new_h


def prepare_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """User mask → (H, W) float32 in [0, 1], 1 = repaint.

    Accepts a 2-D numpy array of 0/1 (any numeric or bool dtype), of 0–255 values, or a PIL
    image (converted to "L", 255 = repaint).  ``size`` is the image's (width, height).
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise UsageError(f"mask must be a 2-D (H, W) array with 1 = repaint, got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.astype(np.float32)
    if not np.issubdtype(mask.dtype, np.number) or not np.isfinite(mask).all():
        raise UsageError("mask must hold finite numbers (0/1 or 0–255)")
    mask = mask.astype(np.float32)
    if mask.min() < 0 or mask.max() > 255:
        raise UsageError(f"mask values must lie in [0, 1] or [0, 255], got [{mask.min()}, {mask.max()}]")
    if mask.max() > 1:
        mask = mask / 255.0
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise UsageError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {size[0]}x{size[1]}; "
            "they must have the same size"
        )
    if not (mask > 0).any():
        raise UsageError("the mask is all zero: nothing to repaint (1 = repaint)")
    return mask


class Kandinsky3InpaintingPipeline(PipelineBase):
    """Inpainting: repaint the masked region of an image following a prompt.

    Components and options as in :class:`~kandinsky3.pipelines.base.PipelineBase`; the U-Net has 9 input channels.
    Defaults follow the original: "original" sampler, 50 steps, guidance 4.0, dynamic thresholding at the 0.95
    percentile.
    """

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
        *,
        guidance_weight_text: float | None = None,
        paste_back: bool = True,
        **options: Any,
    ) -> Any:
        """Repaint ``mask`` (H×W, 1 = repaint) of ``image`` (PIL) following ``prompt``.

        ``guidance_weight_text`` is the original's name for ``guidance_scale`` (default: the model's, else 4.0).
        Returns images of the input's size (``output_type`` "pil", "np" or "pt"; "latent" gives the working-size
        latents), with the kept pixels pasted back unless ``paste_back=False``. ``options``:
        :class:`~kandinsky3.pipelines.checks.CallOptions`.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        with validating():
            call = checks.CallOptions(**options)
            if guidance_weight_text is not None:
                if call.guidance_scale is not None:
                    raise UsageError("pass either guidance_scale or guidance_weight_text, not both")
                call = dataclasses.replace(call, guidance_scale=guidance_weight_text)
            user_mask = prepare_mask(mask, image.size)
            batch = checks.prompts_per_image(prompt, negative_prompt, call.num_images_per_prompt)
            plan = self._plan(call, negative_prompt)
            width, height = working_size(*image.size, checks.size_multiple(self.unet, self.movq))
            generators = make_generators(call.seed, call.generator, len(batch.prompts))
        pixels = pil_to_tensor(image, width, height)  # (1, 3, H', W') in [-1, 1]
        repaint = self._resize_mask(user_mask, width, height)  # (1, 1, H', W')
        with self.residency.phase("movq", self.movq):
            extra = inpainting_channels(self.movq, pixels, repaint)  # (1, 5, h, w)
        extra = extra.expand(len(batch.prompts), -1, -1, -1)
        conditions = self._encode(batch, plan)
        latent_shape = (self.movq.config.z_channels, *extra.shape[-2:])

        def start(indices: list[int], gen) -> torch.Tensor:
            return initial_noise((len(indices), *latent_shape), gen, torch.device("cpu"))

        latents = self._denoise(conditions, start, plan, generators, call, extra_channels=extra)
        if call.output_type == "latent":
            return latents
        generated = self._decode(latents)  # (B, 3, H', W') in [-1, 1]
        return to_output(self._finish(generated, image, user_mask, paste_back), call.output_type)

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
        size = (image.size[1], image.size[0])
        if generated.shape[-2:] != size:
            generated = F.interpolate(generated, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        if not paste_back:
            return generated
        original = pil_to_tensor(image, *image.size)  # (1, 3, H, W)
        alpha = torch.from_numpy(mask)[None, None]  # (1, 1, H, W), 1 = repaint
        return alpha * generated + (1 - alpha) * original
