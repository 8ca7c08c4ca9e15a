"""Sample grids written during training (``<out_dir>/samples/step_XXXXXX.png``), images in [-1,1].

- U-Net runs sample with the real inference pipelines: one row of ``samples.prompts`` (base), or a
  row of masked dataset images above a row of their repaints under their own captions (inpainting).
- MoVQ runs show rows of inputs, quantised reconstructions with the live and with the EMA weights,
  and the EMA ``decode(encode(x))`` without the quantiser (what the diffusion pipelines use).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.movq import MoVQ
from .config import UNetTrainConfig
from .image_datasets import ImageSource
from .inpainting_masks import random_mask

__all__ = ["grid_path", "save_image_grid", "unet_samples", "movq_samples"]


def grid_path(out_dir: Path, step: int) -> Path:
    return out_dir / "samples" / f"step_{step:06d}.png"


def save_image_grid(images: torch.Tensor, columns: int, path: Path) -> None:
    """Write (N,3,H,W) images in [-1,1] as one PNG, ``columns`` images per row."""
    from PIL import Image

    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.zeros(3, rows * h, columns * w, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


@torch.no_grad()
def unet_samples(config: UNetTrainConfig, unet: nn.Module, movq: nn.Module, text_encoder: nn.Module,
                 images: ImageSource) -> tuple[torch.Tensor, int]:
    """(N,3,S,S) sample images in [-1,1] and the grid's number of columns, from the real pipeline (seed 0)."""
    size = config.data.image_size
    common = dict(steps=config.samples.steps, guidance_scale=config.samples.guidance, sampler=config.samples.sampler,
                  seed=0, output_type="pt", progress=False)
    if config.model.mode == "base":
        from ..pipelines.text_to_image import Kandinsky3Pipeline

        pipe = Kandinsky3Pipeline(unet, movq, text_encoder)
        samples = pipe(list(config.samples.prompts), width=size, height=size, **common) * 2 - 1
        return samples, len(samples)
    from PIL import Image

    from ..pipelines.inpainting import Kandinsky3InpaintingPipeline

    pipe = Kandinsky3InpaintingPipeline(unet, movq, text_encoder)
    count = min(len(config.samples.prompts), len(images))
    pixels, captions = images.batch(torch.arange(count))
    masked, results = [], []
    for i in range(count):
        mask = random_mask(size, size, torch.Generator().manual_seed(i), config.data.mask_coverage).mask
        array = ((pixels[i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        results.append(pipe(captions[i], Image.fromarray(array), mask.numpy(), **common)[0] * 2 - 1)  # (3,S,S)
        masked.append(pixels[i] * (1 - mask))
    return torch.cat([torch.stack(masked), torch.stack(results)]), count


@torch.no_grad()
def movq_samples(live: MoVQ, averaged: MoVQ, images: torch.Tensor) -> torch.Tensor:
    """Rows of the MoVQ grid for (n,3,H,W) ``images``: inputs; quantised reconstructions with the ``live`` and
    with the ``averaged`` (EMA) weights; the averaged ``decode(encode(x))`` without the quantiser. Both models
    must be in eval mode."""
    unquantised = averaged.decode(averaged.encode(images))
    return torch.cat([images, live(images)[0], averaged(images)[0], unquantised])
