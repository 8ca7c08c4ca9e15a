"""Images in and out of the pipelines: PIL images ↔ (B, 3, H, W) tensors in [−1, 1], output formats, and the MoVQ
between images and (B, 4, H/8, W/8) latents (whole or in tiles).

    pixels = pil_to_tensor(image, 512, 512)              # (1, 3, 512, 512) in [−1, 1]
    latents = encode_images(movq, pixels)                # (1, 4, 64, 64) fp32
    images = decode_latents(movq, latents, tiling=DecodeTiling(tile=32, overlap=8))
    to_output(images, "pil")                             # [PIL.Image]

Also the inputs' side of inpainting: :func:`prepare_mask` (a user's mask → 1 = repaint) and :func:`working_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import NonFiniteError, UsageError, UsageTypeError, validating
from ..lowmem.storage import compute_dtype
from ..models.movq_tiling import check_tiling, decode_tiled

__all__ = [
    "MAX_PIXELS", "DecodeTiling", "decode_latents", "encode_images", "pil_to_tensor", "prepare_mask", "resize_images",
    "to_output", "working_size",
]

MAX_PIXELS = 1024 * 1024  # inpainting's working size is capped at about 1 MP, as in the original (never upscaled)


@dataclass(frozen=True)
class DecodeTiling:
    """Decode latents in overlapping ``tile``² tiles blended across ``overlap`` (latent pixels; 64 = 512 px).

    Set ``pipe.decode_tiling = DecodeTiling(64, 16)`` (None: whole latents, the default): the decoder's memory
    stops growing with the image (1024 px and up), for results that differ slightly from the whole-latent decode
    (per-tile normalisation; :func:`kandinsky3.models.movq_tiling.decode_tiled`). diffusers calls this VAE tiling.
    """

    tile: int = 64
    overlap: int = 16

    def __post_init__(self):
        with validating():
            check_tiling(self.tile, self.overlap)


def decode_latents(
    movq: torch.nn.Module, latents: torch.Tensor, slice_size: int | None = 1, tiling: DecodeTiling | None = None
) -> torch.Tensor:
    """(B, 4, h, w) latents → (B, 3, 8h, 8w) fp32 images in about [−1, 1] on the CPU.

    Decodes ``slice_size`` latents at a time (None = the whole batch) so the 16384-token MoVQ attentions of large
    images never hold a whole batch at once; with ``tiling`` each latent is decoded in overlapping tiles. On the
    CPU the decoder runs channels-last (oneDNN's native layout: no reordered copies of the full-size activations;
    a third less peak memory at 512 px).
    """
    device, dtype = next(movq.parameters()).device, compute_dtype(movq)
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    size = latents.shape[0] if not slice_size else slice_size
    images = []
    with torch.inference_mode():
        for chunk in latents.split(size):
            chunk = chunk.to(device, dtype).contiguous(memory_format=layout)
            if tiling is None:
                decoded = movq.decode(chunk)
            else:
                decoded = decode_tiled(movq, chunk, tile=tiling.tile, overlap=tiling.overlap)
            images.append(decoded.float().cpu().contiguous())
    images = torch.cat(images)
    if not torch.isfinite(images).all():
        raise NonFiniteError(f"the MoVQ decode (computing in {str(dtype).removeprefix('torch.')}) produced NaN or "
                             "infinite pixels; load the MoVQ in fp32 (LoadOptions(dtype={'movq': 'fp32'}))")
    return images


def encode_images(movq: torch.nn.Module, images: torch.Tensor, slice_size: int | None = 1) -> torch.Tensor:
    """(B, 3, H, W) images in [−1, 1] → (B, 4, H/8, W/8) fp32 latents on the images' device."""
    device, dtype = next(movq.parameters()).device, compute_dtype(movq)
    size = images.shape[0] if not slice_size else slice_size
    latents = []
    with torch.inference_mode():
        for chunk in images.split(size):
            latents.append(movq.encode(chunk.to(device, dtype)).float().to(images.device))
    return torch.cat(latents)


def to_output(images: torch.Tensor, output_type: str) -> Any:
    """(B, 3, H, W) images in [−1, 1] → a list of PIL images ("pil"), (B, H, W, 3) np.float32 in [0, 1] ("np"),
    or a (B, 3, H, W) tensor in [0, 1] ("pt"). 8-bit images are rounded, not truncated."""
    images = ((images.float() + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def pil_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB PIL image resized (bicubic) to width×height → (1, 3, height, width) in [−1, 1]."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) images in [−1, 1] → (B, 3, height, width) for ``size`` = (width, height): bicubic, clamped to
    [−1, 1] (unchanged when already that size)."""
    if images.shape[-2:] == (size[1], size[0]):
        return images
    return F.interpolate(images, size=(size[1], size[0]), mode="bicubic", align_corners=False).clamp(-1, 1)


def working_size(width: int, height: int, multiple: int = 64) -> tuple[int, int]:
    """Inpainting's working size, as the original's: scale down to at most ~1 MP, then floor each side to
    ``multiple``."""
    reduce = max(1.0, math.sqrt(width * height / MAX_PIXELS))
    new_w = int(round(width / reduce)) // multiple * multiple
    new_h = int(round(height / reduce)) // multiple * multiple
    if new_w == 0 or new_h == 0:
        raise UsageError(f"the image ({width}x{height}) is too small; both sides must be at least {multiple}")
    return new_w, new_h


def prepare_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """A user's mask → (H, W) float32 in [0, 1], 1 = repaint; ``size`` is the image's (width, height).

    Accepts a 2-D array or tensor of bools, of 0/1 values or of 0–255 values (a largest value above 1 means the
    0–255 range), or a PIL image read the same way: mode "1" as bools, 8-bit modes as their grey levels (a PNG of
    0/1 values is a 0/1 mask, one of 0/255 values a 0–255 mask), 16-bit modes scaled by 65535 when above 255.
    """
    if isinstance(mask, Image.Image):
        mask = _image_mask(mask)
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, (np.ndarray, list, tuple)):
        raise UsageTypeError(f"mask must be a PIL image or a 2-D array (1 = repaint), got {type(mask).__name__}")
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


def _image_mask(image: Image.Image) -> np.ndarray:
    """A mask image's values as an array: bools for mode "1", 16-bit levels scaled to [0, 1], else grey levels."""
    if image.mode == "1":
        return np.asarray(image, dtype=bool)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        levels = np.asarray(image, dtype=np.float32)
        return levels / 65535.0 if levels.max() > 255 else levels
    return np.asarray(image.convert("L"))
