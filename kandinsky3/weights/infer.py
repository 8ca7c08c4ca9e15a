"""Infer U-Net and MoVQ configs from the tensor shapes of original-layout checkpoints (which carry no config).

Shapes determine everything except the attention head size and the GroupNorm group count (and MoVQ's training
resolution). Those default to the released values (head_dim 64, groups 32; MoVQ norm_groups 32, resolution 256,
docs/architecture.md §2.1, §3.1); a checkpoint whose widths they do not divide needs them passed explicitly.

Per-level U-Net tuples follow the zip semantics of :class:`kandinsky3.models.unet_config.UNetConfig`
(docs/practice.md §10.2): the down path reads ``tuple[:n]``, the up path ``tuple[::-1][:n]``. When the up levels
mirror the down levels the inferred tuples have n entries; otherwise they have 2n entries ``down + reversed(up)``,
which reproduces e.g. diffusers' 2-level configs (down attention (False, True), up attention (True, True)).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

from kandinsky3.models.movq import MoVQConfig
from kandinsky3.models.unet_config import UNetConfig
from kandinsky3.weights.safe_io import CheckpointError

__all__ = ["infer_unet_config", "infer_movq_config", "per_level"]

Shapes = Mapping[str, tuple[int, ...]]
_RESNET_ENTRY = re.compile(r"^(.*\.)resnet_blocks\.0\.projection\.weight$")


def _need(shapes: Shapes, key: str, path: Path | None, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(path, f"not an original-layout {what} state dict: it has no {key!r}")
    return tuple(shapes[key])


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers i of keys ``{prefix}{i}.…``."""
    found = {int(key[len(prefix):].split(".", 1)[0]) for key in shapes
             if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()}
    return sorted(found)


def _contiguous(indices: list[int], what: str, path: Path | None) -> int:
    if not indices or indices != list(range(len(indices))):
        raise CheckpointError(path, f"{what} indices {indices} are not 0..n-1")
    return len(indices)


def per_level(down: list, up: list) -> tuple:
    """Zip-semantics tuple whose ``[:n]`` is ``down`` and whose ``[::-1][:n]`` is ``up`` (see module doc)."""
    if list(up) == list(reversed(down)):
        return tuple(down)
    return tuple(down) + tuple(reversed(up))


def _compression_ratio(shapes: Shapes, path: Path | None) -> int:
    """The integer c with max(in, out) // c == bottleneck width for every bottleneck ResNet (prefer 2)."""
    low, high = 1, None
    for key, shape in shapes.items():
        match = _RESNET_ENTRY.match(key)
        if match is None:
            continue
        hidden, width_in = shape[0], shape[1]
        width_out = _need(shapes, match.group(1) + "resnet_blocks.3.projection.weight", path, "U-Net")[0]
        widest = max(width_in, width_out)
        low = max(low, widest // (hidden + 1) + 1)  # widest // c == hidden  <=>  c in (w/(h+1), w/h]
        high = widest // hidden if high is None else min(high, widest // hidden)
    if high is None or low > high:
        raise CheckpointError(path, "the ResNet bottleneck widths fit no single compression_ratio")
    return 2 if low <= 2 <= high else low


def _expansion_ratio(shapes: Shapes, path: Path | None) -> int:
    ratios = set()
    for key, shape in shapes.items():
        if key.endswith("feed_forward.0.weight"):
            if shape[0] % shape[1]:
                raise CheckpointError(path, f"{key} has shape {shape}: feed-forward width is not a multiple of C")
            ratios.add(shape[0] // shape[1])
    if len(ratios) > 1:
        raise CheckpointError(path, f"attention feed-forward blocks use different expansion ratios {sorted(ratios)}")
    return ratios.pop() if ratios else UNetConfig.expansion_ratio


def _level_flags(shapes: Shapes, prefix: str, path: Path | None) -> tuple[int, bool, bool]:
    """(triples, has cross-attention, has self-attention) of one level ``prefix`` = ``down_samples.L.``."""
    triples = _contiguous(_indices(shapes, prefix + "resnet_attn_blocks."), prefix + "resnet_attn_blocks", path)
    cross = prefix + "resnet_attn_blocks.0.1.attention.to_key.weight" in shapes
    self_attention = any(key.startswith(prefix + "self_attention_block.") for key in shapes)
    return triples, cross, self_attention


def infer_unet_config(
    shapes: Shapes, *, head_dim: int = 64, groups: int = 32, path: Path | None = None
) -> UNetConfig:
    """UNetConfig of an original-layout U-Net state dict (architecture §2.10) from its shapes ``{key: shape}``."""
    init_channels, num_channels = _need(shapes, "in_layer.weight", path, "U-Net")[:2]
    levels = _contiguous(_indices(shapes, "down_samples."), "down_samples", path)
    if _indices(shapes, "up_samples.") != list(range(levels)):
        raise CheckpointError(path, f"{levels} down levels but up levels {_indices(shapes, 'up_samples.')}")
    out_conv = "down_samples.{}.resnet_attn_blocks.0.2.resnet_blocks.3.projection.weight"  # (width, hidden, 1, 1)
    widths = [_need(shapes, out_conv.format(level), path, "U-Net")[0] for level in range(levels)]
    model_channels = math.gcd(*widths)
    down = [_level_flags(shapes, f"down_samples.{level}.", path) for level in range(levels)]
    up = [_level_flags(shapes, f"up_samples.{level}.", path) for level in range(levels)]
    values = dict(
        model_channels=model_channels,
        init_channels=init_channels,
        num_channels=num_channels,
        out_channels=_need(shapes, "out_layer.2.weight", path, "U-Net")[0],
        time_embed_dim=_need(shapes, "to_time_embed.1.weight", path, "U-Net")[0],
        context_dim=_need(shapes, "feature_pooling.attention.to_key.weight", path, "U-Net")[1],
        groups=groups,
        head_dim=head_dim,
        expansion_ratio=_expansion_ratio(shapes, path),
        compression_ratio=_compression_ratio(shapes, path),
        dim_mult=tuple(width // model_channels for width in widths),
        num_blocks=per_level([d[0] for d in down], [u[0] for u in up]),
        add_cross_attention=per_level([d[1] for d in down], [u[1] for u in up]),
        add_self_attention=per_level([d[2] for d in down], [u[2] for u in up]),
    )
    try:
        return UNetConfig(**values)
    except ValueError as error:
        raise CheckpointError(
            path,
            f"the U-Net config inferred from the shapes is invalid ({error}). head_dim and groups are not "
            f"determined by the shapes (assumed head_dim={head_dim}, groups={groups}); pass head_dim=/groups= "
            "or a full config=",
        ) from None


def infer_movq_config(
    shapes: Shapes, *, norm_groups: int = 32, resolution: int = 256, path: Path | None = None
) -> MoVQConfig:
    """MoVQConfig of an original-layout MoVQ state dict (docs/architecture.md §3.4) from its shapes ``{key: shape}``.

    Attention levels become ``attn_resolutions`` under the convention that level i works at
    ``resolution // 2**i`` (the released model: resolution 256, attention at 32 = level 3).
    """
    ch, in_channels = _need(shapes, "encoder.conv_in.weight", path, "MoVQ")[:2]
    levels = _contiguous(_indices(shapes, "encoder.down."), "encoder.down", path)
    if _indices(shapes, "decoder.up.") != list(range(levels)):
        raise CheckpointError(path, f"{levels} encoder levels but decoder levels {_indices(shapes, 'decoder.up.')}")
    widths = [_need(shapes, f"encoder.down.{i}.block.0.conv1.weight", path, "MoVQ")[0] for i in range(levels)]
    if any(width % ch for width in widths):
        raise CheckpointError(path, f"level widths {widths} are not multiples of conv_in's width {ch}")
    encoder_attention = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in shapes]
    decoder_attention = [i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in shapes]
    if encoder_attention != decoder_attention:
        raise CheckpointError(
            path, f"encoder attention levels {encoder_attention} differ from decoder levels {decoder_attention}"
        )
    resolution = max(resolution, 2 ** (levels - 1))
    codebook = shapes.get("quantize.embedding.weight")
    values = dict(
        ch=ch,
        ch_mult=tuple(width // ch for width in widths),
        num_res_blocks=len(_indices(shapes, "encoder.down.0.block.")),
        attn_resolutions=tuple(resolution // 2**i for i in encoder_attention),
        resolution=resolution,
        z_channels=_need(shapes, "quant_conv.weight", path, "MoVQ")[0],
        in_channels=in_channels,
        out_ch=_need(shapes, "decoder.conv_out.weight", path, "MoVQ")[0],
        norm_groups=norm_groups,
        codebook_size=0 if codebook is None else codebook[0],
    )
    try:
        return MoVQConfig(**values)
    except ValueError as error:
        raise CheckpointError(
            path,
            f"the MoVQ config inferred from the shapes is invalid ({error}). norm_groups is not determined by "
            f"the shapes (assumed {norm_groups}); pass norm_groups= or a full config=",
        ) from None
