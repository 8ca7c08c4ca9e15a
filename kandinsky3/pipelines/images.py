"""Images in and out of the pipelines: PIL images ↔ (B, 3, H, W) tensors in [−1, 1], output formats, and the MoVQ
between images and (B, 4, H/8, W/8) latents (whole or in tiles).

    pixels = pil_to_tensor(image, 512, 512)              # (1, 3, 512, 512) in [−1, 1]
    latents = encode_images(movq, pixels)                # (1, 4, 64, 64) fp32
    images = decode_latents(movq, latents, tiling=DecodeTiling(tile=32, overlap=8))
    to_output(images, "pil")                             # [PIL.Image]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import validating
from ..lowmem.storage import compute_dtype
from ..models.movq_tiling import check_tiling, decode_tiled

__all__ = ["DecodeTiling", "decode_latents", "encode_images", "pil_to_tensor", "to_output"]


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
    return torch.cat(images)


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
