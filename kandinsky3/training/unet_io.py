"""What the U-Net trainer reads and writes besides checkpoints: the text encoder it trains with,
the initial U-Net (GLIDE-style expansion for inpainting), sample grids and the final export.

The export is the native layout of :mod:`kandinsky3.weights.native`::

    final/kandinsky3.json                 {"format": "kandinsky3", "format_version": 1, "conditioning": "original",
                                           "variant": "base" | "inpainting", "components": [...]}
    final/unet/config.json, model.safetensors
    final/movq/config.json, model.safetensors       (copied from the MoVQ run)
    final/text_encoder/                   T5 config.json + model.safetensors, tokenizer files,
                                          conditioning.safetensors (projection.0.weight, projection.1.weight,
                                          projection.1.bias, null_embedding)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.text_encoder import TextEncoder
from ..models.unet import UNetConfig
from .config import UNetRunConfig
from .distributed import barrier, full_state_dict
from .loop import save_image_grid
from .masks import random_mask
from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from .train_movq import MOVQ_CONFIG, MOVQ_WEIGHTS

logger = logging.getLogger(__name__)

__all__ = ["build_text_encoder", "glide_init_state", "load_init_unet", "save_samples", "export_final"]

CONDITIONING_FILE = "conditioning.safetensors"


def build_text_encoder(config: UNetRunConfig, captions: list[str], out_dir: Path, is_main: bool) -> TextEncoder:
    """The run's :class:`TextEncoder` on the CPU (weights drawn from the global RNG: seed it first).

    Pretrained (``text_encoder_path``): T5 + tokenizer from the folder, and the projection and null
    embedding from its ``conditioning.safetensors`` when present (a previous run's export).
    Fresh (``t5_config``): the tokenizer from ``tokenizer_dir`` (default ``out_dir/tokenizer``),
    trained on ``captions`` by rank 0 when the folder has none, and a new T5 whose vocabulary size
    is the tokenizer's.
    """
    from transformers import T5Config, T5EncoderModel

    context_dim = config.unet_config.context_dim
    if config.text_encoder_path:
        folder = Path(config.text_encoder_path)
        t5 = T5EncoderModel.from_pretrained(str(folder))
        tokenizer = load_tokenizer(folder)
    else:
        folder = Path(config.tokenizer_dir) if config.tokenizer_dir else out_dir / "tokenizer"
        if is_main and not (folder / "tokenizer_config.json").is_file():
            save_tokenizer(train_tokenizer(captions, config.tokenizer_vocab_size), folder)
        barrier()
        tokenizer = load_tokenizer(folder)
        fields = dict(config.t5_config)
        if fields.setdefault("vocab_size", len(tokenizer)) < len(tokenizer):
            raise ValueError(f"t5_config.vocab_size {fields['vocab_size']} < tokenizer size {len(tokenizer)}")
        fields.update(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        t5 = T5EncoderModel(T5Config(**fields))
    encoder = TextEncoder(t5, tokenizer, context_dim=context_dim, max_length=config.max_length,
                          freeze_t5=not config.train_text_encoder)
    conditioning = Path(config.text_encoder_path) / CONDITIONING_FILE if config.text_encoder_path else None
    if conditioning is not None and conditioning.is_file():
        tensors = load_file(str(conditioning))
        encoder.load_projection({k[len("projection."):]: v for k, v in tensors.items() if k.startswith("projection.")})
        if "null_embedding" in tensors:
            encoder.load_null_embedding(tensors["null_embedding"].reshape(-1))
        logger.info("text projection and null embedding from %s", conditioning)
    return encoder


def glide_init_state(base: dict[str, torch.Tensor], num_channels: int) -> dict[str, torch.Tensor]:
    """A base U-Net state dict expanded to ``num_channels`` inputs, GLIDE-style (SPEC §8).

    Every tensor is copied; ``in_layer.weight`` (C,4,3,3) becomes (C,num_channels,3,3) with the
    base kernel in input channels 0-3 and zeros for the new ones, so the expanded network gives
    exactly the base network's output whatever the extra channels hold.
    """
    weight = base["in_layer.weight"]
    if weight.shape[1] > num_channels:
        raise ValueError(f"cannot shrink in_layer from {weight.shape[1]} to {num_channels} input channels")
    expanded = weight.new_zeros(weight.shape[0], num_channels, *weight.shape[2:])
    expanded[:, : weight.shape[1]] = weight
    return {**base, "in_layer.weight": expanded}


def load_init_unet(folder: str | Path, target: UNetConfig) -> dict[str, torch.Tensor]:
    """State dict for ``target`` from a U-Net folder (config.json + model.safetensors).

    The folder's config must equal ``target`` except perhaps for ``num_channels``; a base model
    (4 channels) loaded into an inpainting config (9) is expanded by :func:`glide_init_state`.
    """
    folder = Path(folder)
    source = UNetConfig.from_dict(json.loads((folder / "config.json").read_text()))
    differ = sorted(k for k, v in source.to_dict().items() if k != "num_channels" and target.to_dict()[k] != v)
    if differ:
        raise ValueError(f"init_unet {folder}: config differs from the run's unet in {differ}")
    state = load_file(str(folder / "model.safetensors"))
    if source.num_channels != target.num_channels:
        state = glide_init_state(state, target.num_channels)
        logger.info("GLIDE init from %s: in_layer %d -> %d input channels, new ones zero", folder,
                    source.num_channels, target.num_channels)
    return state


@torch.no_grad()
def save_samples(config: UNetRunConfig, unet: nn.Module, movq: nn.Module, text_encoder: TextEncoder, data,
                 step: int, write: bool) -> Path | None:
    """``samples/step_XXXXXX.png`` with the real pipeline: one row of ``sample_prompts`` (base), or
    rows of masked inputs and repaints of the first dataset images under their own captions (inpainting)."""
    size = config.image_size
    common = dict(steps=config.sample_steps, guidance_scale=config.sample_guidance, sampler=config.sample_sampler,
                  seed=0, output_type="pt", progress=False)
    if config.mode == "base":
        from ..pipelines.text_to_image import Kandinsky3Pipeline

        pipe = Kandinsky3Pipeline(unet, movq, text_encoder)
        images = pipe(list(config.sample_prompts), width=size, height=size, **common) * 2 - 1
        columns = len(images)
    else:
        images, columns = _inpainting_samples(config, unet, movq, text_encoder, data, common)
    if not write:
        return None
    path = Path(config.out_dir) / "samples" / f"step_{step:06d}.png"
    save_image_grid(images, columns=columns, path=path)
    return path


def _inpainting_samples(config, unet, movq, text_encoder, data, common) -> tuple[torch.Tensor, int]:
    from PIL import Image

    from ..pipelines.inpainting import Kandinsky3InpaintingPipeline

    pipe = Kandinsky3InpaintingPipeline(unet, movq, text_encoder)
    count = min(len(config.sample_prompts), len(data))
    pixels, captions = data.images.batch(torch.arange(count))
    masked, results = [], []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        mask = random_mask(config.image_size, config.image_size, generator, config.mask_coverage).mask
        array = ((pixels[i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        out = pipe(captions[i], Image.fromarray(array), mask.numpy(), **common)[0] * 2 - 1  # (3,H,W)
        masked.append(pixels[i] * (1 - mask))
        results.append(out)
    return torch.cat([torch.stack(masked), torch.stack(results)]), count


def export_final(config: UNetRunConfig, raw: nn.Module, folder: Path, write: bool) -> None:
    """Write the current weights of ``raw`` (a DiffusionModel) to ``folder`` in the native layout.

    Every rank calls this (gathers under FSDP); only ``write`` (rank 0) writes files.
    """
    unet_state = full_state_dict(raw.unet)
    text_state = full_state_dict(raw.text_encoder)
    if not write:
        return
    encoder: TextEncoder = raw.text_encoder
    _write_component(folder / "unet", raw.unet.config.to_dict(), unet_state)
    movq_folder = Path(config.movq_path)
    (folder / "movq").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(movq_folder / MOVQ_CONFIG, folder / "movq" / "config.json")
    shutil.copyfile(movq_folder / MOVQ_WEIGHTS, folder / "movq" / "model.safetensors")
    text_folder = folder / "text_encoder"
    t5_state = {k[len("t5."):]: v for k, v in text_state.items() if k.startswith("t5.")}
    t5 = type(encoder.t5)(encoder.t5.config) if config.fsdp else encoder.t5
    if config.fsdp:
        t5.load_state_dict(t5_state)
    t5.save_pretrained(str(text_folder))
    encoder.tokenizer.save_pretrained(str(text_folder))
    conditioning = {k: v.contiguous() for k, v in text_state.items() if k.startswith("projection.")}
    conditioning["null_embedding"] = text_state["null_embedding"].reshape(-1).contiguous()
    save_file(conditioning, str(text_folder / CONDITIONING_FILE), metadata={"format": "pt"})
    manifest = {"format": "kandinsky3", "format_version": 1, "conditioning": "original",
                "variant": "inpainting" if config.mode == "inpainting" else "base",
                "components": ["unet", "movq", "text_encoder"]}
    (folder / "kandinsky3.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("exported the %s model to %s", manifest["variant"], folder)


def _write_component(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
