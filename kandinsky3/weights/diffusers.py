"""The diffusers Kandinsky 3 layout (``kandinsky-community/kandinsky-3``), read without diffusers.

docs/architecture.md §2.11, §3.5 and docs/practice.md §7.

A pipeline folder::

    model_index.json
    unet/config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin)   Kandinsky3UNet, projection folded in
    movq/config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin)   VQModel(norm_type="spatial")
    text_encoder/   T5EncoderModel (the Hub copy has only fp16-variant shards)
    tokenizer/      T5 tokenizer
    scheduler/scheduler_config.json

Keys are renamed lazily to the original names with :mod:`kandinsky3.weights.unet_keys` and
:mod:`kandinsky3.weights.movq_keys`. The text projection comes out of the U-Net (``encoder_hid_proj``). There is
no null embedding, so the conditioning style is "diffusers" (docs/architecture.md §4.5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kandinsky3.models.movq import MoVQConfig
from kandinsky3.models.unet_config import UNetConfig
from kandinsky3.weights.movq_keys import diffusers_to_original_movq, original_to_diffusers_keys
from kandinsky3.weights.original import read_flat_file
from kandinsky3.weights.safe_io import CheckpointError
from kandinsky3.weights.sources import (
    Checkpoint,
    ModelSource,
    RenamedSource,
    SafetensorsSource,
    TensorSource,
    TextSource,
)
from kandinsky3.weights.unet_keys import diffusers_to_original_unet

__all__ = [
    "is_diffusers_folder",
    "find_weights",
    "open_weights",
    "read_json",
    "movq_config_from_diffusers",
    "unet_from_diffusers",
    "movq_from_diffusers",
    "DiffusersCheckpoint",
]

_WEIGHT_STEM = "diffusion_pytorch_model"
_SPATIAL_NORM_GROUPS = 32  # diffusers' SpatialNorm hard-codes 32 groups (docs/architecture.md §3.2)


def is_diffusers_folder(root: Path) -> bool:
    return (root / "model_index.json").is_file()


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, naming the file in any error."""
    if not path.is_file():
        raise CheckpointError(path, "is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(path, f"is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"must hold a JSON object, got {type(data).__name__}")
    return data


def find_weights(folder: Path, stem: str = _WEIGHT_STEM, prefer_fp16: bool = False) -> Path:
    """The weight file of a diffusers component folder: safetensors before .bin; plain before the fp16 variant
    unless ``prefer_fp16``."""
    variants = ["", ".fp16"] if not prefer_fp16 else [".fp16", ""]
    for suffix in (".safetensors", ".bin"):
        for variant in variants:
            candidate = folder / f"{stem}{variant}{suffix}"
            if candidate.is_file():
                return candidate
    raise CheckpointError(folder, f"holds no {stem}[.fp16].safetensors or {stem}[.fp16].bin weight file")


def open_weights(path: Path) -> TensorSource:
    """A lazy source over a ``.safetensors`` file or a ``torch.save`` pickle (``.bin`` / ``.pt``)."""
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    return read_flat_file(path)


def _meta_tensors(source: TensorSource) -> dict[str, torch.Tensor]:
    return {key: torch.empty(source.meta(key)[0], device="meta") for key in source}


def unet_from_diffusers(folder: Path, prefer_fp16: bool = False) -> tuple[ModelSource, TensorSource]:
    """(U-Net under original names with its UNetConfig, projection under ``projection.{0.weight,1.weight,1.bias}``)."""
    config_path = folder / "config.json"
    try:
        config = UNetConfig.from_diffusers(read_json(config_path))
    except (TypeError, ValueError) as error:
        raise CheckpointError(config_path, f"cannot be turned into a UNetConfig ({error})") from None
    base = open_weights(find_weights(folder, prefer_fp16=prefer_fp16))
    metas = _meta_tensors(base)
    owner = {id(tensor): key for key, tensor in metas.items()}  # the key modules pass tensors through unchanged
    try:
        unet, projection = diffusers_to_original_unet(metas)
    except ValueError as error:
        raise CheckpointError(base.path, str(error)) from None
    unet_source = RenamedSource(base, {key: owner[id(tensor)] for key, tensor in unet.items()})
    projection_source = RenamedSource(base, {f"projection.{k}": owner[id(t)] for k, t in projection.items()})
    return ModelSource(unet_source, config), projection_source


def movq_config_from_diffusers(config: dict[str, Any], path: Path | None = None) -> MoVQConfig:
    """MoVQConfig of a diffusers ``VQModel`` config (docs/architecture.md §3.1); the unused codebook is not kept.

    Attention levels follow the resolution-256 convention (level i works at 256 // 2**i).
    """
    def fail(problem: str) -> CheckpointError:
        return CheckpointError(path, f"this VQModel config cannot be a Kandinsky 3 MoVQ: {problem}")

    widths = list(config.get("block_out_channels", (64,)))
    down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    if config.get("norm_type", "group") != "spatial":
        raise fail(f"norm_type is {config.get('norm_type', 'group')!r}, MoVQ needs 'spatial'")
    if not (len(widths) == len(down) == len(up)):
        raise fail(f"{len(widths)} block_out_channels, {len(down)} down blocks, {len(up)} up blocks")
    attention = [i for i, kind in enumerate(down) if kind.startswith("Attn")]
    up_attention = sorted(len(up) - 1 - j for j, kind in enumerate(up) if kind.startswith("Attn"))
    if attention != up_attention:
        raise fail(f"encoder attention levels {attention} differ from decoder levels {up_attention}")
    groups = config.get("norm_num_groups", 32)
    if groups != _SPATIAL_NORM_GROUPS:
        raise fail(f"norm_num_groups={groups}, but its decoder's SpatialNorm always uses 32 groups")
    latent = config.get("latent_channels", 3)
    if config.get("vq_embed_dim") not in (None, latent):
        raise fail(f"vq_embed_dim {config.get('vq_embed_dim')} != latent_channels {latent}")
    if config.get("act_fn", "silu") != "silu" or not config.get("mid_block_add_attention", True):
        raise fail("act_fn must be 'silu' and mid_block_add_attention true")
    if any(width % widths[0] for width in widths):
        raise fail(f"block_out_channels {widths} are not multiples of the first")
    resolution = max(256, 2 ** (len(widths) - 1))
    try:
        return MoVQConfig(
            ch=widths[0],
            ch_mult=tuple(width // widths[0] for width in widths),
            num_res_blocks=config.get("layers_per_block", 1),
            attn_resolutions=tuple(resolution // 2**i for i in attention),
            resolution=resolution,
            z_channels=latent,
            in_channels=config.get("in_channels", 3),
            out_ch=config.get("out_channels", 3),
            norm_groups=groups,
        )
    except ValueError as error:
        raise fail(str(error)) from None


def movq_from_diffusers(folder: Path, prefer_fp16: bool = False) -> ModelSource:
    """The MoVQ of a diffusers ``movq/`` folder under original names (attention weights reshaped to 1×1 convs)."""
    config = movq_config_from_diffusers(read_json(folder / "config.json"), folder / "config.json")
    base = open_weights(find_weights(folder, prefer_fp16=prefer_fp16))
    try:
        converted = diffusers_to_original_movq(_meta_tensors(base), config)  # validates every name and shape
    except ValueError as error:
        raise CheckpointError(base.path, str(error)) from None
    table = original_to_diffusers_keys(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in converted.items()}
    return ModelSource(RenamedSource(base, {key: table[key] for key in converted}, shapes), config)


def _has_fp16_variant(folder: Path) -> bool:
    return any(folder.glob("*.fp16*.safetensors")) or any(folder.glob("*.fp16.bin")) or any(
        folder.glob("*.index.fp16.json")
    )


def _has_plain_weights(folder: Path) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return any((folder / name).is_file() for name in names)


class DiffusersCheckpoint(Checkpoint):
    """A local diffusers Kandinsky 3 pipeline folder. Only the base model exists in this layout.

    ``prefer_fp16`` picks the fp16 variant files when both they and full-precision files are present.
    """

    layout = "diffusers"
    conditioning = "diffusers"

    def __init__(self, root: str | Path, variant: str | None = None, *, prefer_fp16: bool = False):
        self.root = Path(root)
        self.model_index = read_json(self.root / "model_index.json")
        if variant not in (None, "base"):
            raise CheckpointError(
                self.root, f"a diffusers Kandinsky 3 folder holds only the base model, not {variant!r}"
            )
        self.variant = "base"
        self.prefer_fp16 = prefer_fp16
        self._unet: tuple[ModelSource, TensorSource] | None = None

    def _unet_parts(self) -> tuple[ModelSource, TensorSource]:
        if self._unet is None:
            self._unet = unet_from_diffusers(self.root / "unet", self.prefer_fp16)
        return self._unet

    def unet_source(self) -> ModelSource:
        return self._unet_parts()[0]

    def movq_source(self) -> ModelSource:
        return movq_from_diffusers(self.root / "movq", self.prefer_fp16)

    def text_source(self) -> TextSource:
        projection = self._unet_parts()[1]
        folder = self.root / "text_encoder"
        fp16 = _has_fp16_variant(folder) and (self.prefer_fp16 or not _has_plain_weights(folder))
        tokenizer = self.root / "tokenizer"
        return TextSource(
            t5_folder=folder,
            tokenizer_folder=tokenizer if tokenizer.is_dir() else folder,
            conditioning={key: projection[key] for key in projection},
            t5_variant="fp16" if fp16 else None,
            conditioning_files=[projection.path],
        )

    @property
    def scheduler_config(self) -> dict[str, Any] | None:
        path = self.root / "scheduler" / "scheduler_config.json"
        return read_json(path) if path.is_file() else None
