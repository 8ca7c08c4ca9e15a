"""Evaluation report of a model trained on the synthetic shapes domain (``kandinsky3 eval``).

Text-to-image: prompts from ``eval_prompts`` on the "seen" and "heldout" splits (held-out
colour×shape pairs never occur in training), scored by :func:`kandinsky3.evaluation.score`:
colour+shape accuracy (every named object present with its colour and shape), position accuracy
(over prompts that state positions or relations).  MoVQ: reconstruction PSNR on evaluation
images.  Inpainting: a one-object scene is rendered without its object, the object's region is
masked (1 = repaint) and the caption is the prompt; the object must appear inside the mask and
the kept pixels must be unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.shapes import COLOURS, Scene, ShapesDataset, eval_prompts, layout
from .evaluation import evaluate, inpainting_score
from .lowmem.storage import compute_dtype

__all__ = ["evaluate_text_to_image", "movq_psnr", "evaluate_inpainting"]


def evaluate_text_to_image(pipe, num_prompts: int = 200, *, seed: int = 0, batch_size: int = 25,
                           progress: bool = False, **call_kwargs: Any) -> dict[str, dict]:
    """{"seen": report, "heldout": report}; each report has colour_shape, position, count, … accuracies.
    ``progress``: a progress bar per split (on stderr)."""
    width = height = call_kwargs.pop("image_size", 64)

    def generate(prompts: list[str], batch_seed: int) -> list[Image.Image]:
        return pipe(prompts, width=width, height=height, seed=batch_seed * 1000, progress=False, **call_kwargs)

    reports = {}
    for split in ("seen", "heldout"):
        report = evaluate(generate, eval_prompts(num_prompts, split), batch_size=batch_size, seed=seed,
                          progress=progress, desc=f"text-to-image, {split} prompts")
        report.pop("records")
        reports[split] = report
    return reports


def movq_psnr(movq: torch.nn.Module, num_images: int = 200, *, image_size: int = 64, seed: int = 4321) -> float:
    """Mean PSNR (dB, images in [0, 1]) of encode→decode on evaluation images (not the training seed)."""
    data = ShapesDataset(num_images, image_size=image_size, seed=seed, split="seen")
    images = torch.stack([data[i][0] for i in range(len(data))])  # (N, 3, H, W) in [-1, 1]
    device, dtype = next(movq.parameters()).device, compute_dtype(movq)
    scores = []
    with torch.inference_mode():
        for chunk in images.split(50):
            x = chunk.to(device, dtype)
            recon = movq.decode(movq.encode(x)).float().clamp(-1, 1).cpu()
            mse = ((recon - chunk) / 2).pow(2).flatten(1).mean(dim=1)  # in [0, 1] units
            scores.extend((10 * torch.log10(1.0 / mse.clamp(min=1e-10))).tolist())
    return float(np.mean(scores))


def _inpainting_case(caption: str, scene: Scene, image_size: int) -> tuple[str, Image.Image, np.ndarray]:
    """(prompt, image without the object, mask of its region with a margin; 1 = repaint)."""
    placement = layout(scene)[0]
    image = Image.new("RGB", (image_size, image_size), COLOURS[scene.background])
    mask = np.zeros((image_size, image_size), dtype=np.float32)
    half = math.ceil(1.6 * placement.r * image_size)  # the object's extent plus a margin
    cx, cy = round(placement.x * image_size), round(placement.y * image_size)
    mask[max(cy - half, 0): cy + half, max(cx - half, 0): cx + half] = 1.0
    return caption, image, mask


def evaluate_inpainting(pipe, num_prompts: int = 200, *, image_size: int = 64, seed: int = 0,
                        progress: bool = False, **call_kwargs: Any) -> dict[str, float]:
    """Object-in-mask rate and unchanged-outside rate over one-object evaluation scenes; ``progress``: a
    progress bar (on stderr)."""
    cases = []
    candidates = eval_prompts(4 * num_prompts, "seen", seed=2024)
    for caption, scene in candidates:
        if len(scene.objects) == 1 and len(cases) < num_prompts:
            cases.append(_inpainting_case(caption, scene, image_size))
    in_mask, unchanged, mad = [], [], []
    for index, (prompt, image, mask) in enumerate(tqdm(cases, desc="inpainting", unit="prompt", disable=not progress)):
        generated = pipe(prompt, image, mask, seed=seed + index, progress=False, **call_kwargs)[0]
        result = inpainting_score(prompt, image, generated, mask)
        in_mask.append(result["object_in_mask"])
        unchanged.append(result["outside_unchanged"])
        mad.append(result["outside_mad"])
    return {
        "num_prompts": len(cases),
        "object_in_mask": float(np.mean(in_mask)),
        "outside_unchanged": float(np.mean(unchanged)),
        "outside_mad": float(np.mean(mad)),
    }
