"""Configuration of the Kandinsky 3 U-Net and the channel plan derived from it.

The field names are the original hyper-parameter names of ai-forever/Kandinsky-3
(``kandinsky3/__init__.py``); architecture §2.1 lists the released values.  The per-level tuples
(``num_blocks``, ``add_cross_attention``, ``add_self_attention``) follow the original's
zip semantics (practice §10.2): the down path uses their first ``levels`` entries, the up path
the first ``levels`` entries of the *reversed* tuple.  With tuples exactly ``levels`` long
this is the natural symmetric network; longer tuples reproduce the original's (and
diffusers') behaviour for configs with fewer than four levels.

:func:`plan_levels` turns a config into the exact channel plan of every block.  The
network constructor and the config validation both read it, so a config that passes
validation always builds a working network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["UNetConfig", "ResNetPlan", "TriplePlan", "LevelPlan", "plan_levels"]


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the Kandinsky 3 U-Net (defaults: the released 3.0/3.1 base model)."""

    model_channels: int = 384
    init_channels: int = 192  # width of in_layer's output and of the timestep sinusoid
    num_channels: int = 4  # input channels: 4 latent channels, 9 for inpainting
    out_channels: int = 4
    time_embed_dim: int = 1536
    context_dim: int = 4096  # width of the (already projected) text context
    groups: int = 32  # GroupNorm groups of every norm
    head_dim: int = 64  # attention head size; heads = width // head_dim
    expansion_ratio: int = 4  # attention feed-forward width = expansion_ratio * C
    compression_ratio: int = 2  # bottleneck width = max(in, out) // compression_ratio
    dim_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_blocks: tuple[int, ...] = (3, 3, 3, 3)  # [ResNet, attention, ResNet] triples per level
    add_cross_attention: tuple[bool, ...] = (False, True, True, True)
    add_self_attention: tuple[bool, ...] = (False, True, True, True)

    def __post_init__(self) -> None:
        # JSON gives lists and a single int is a convenient shorthand for num_blocks.
        levels = len(self.dim_mult) if not isinstance(self.dim_mult, int) else 1
        for name in ("dim_mult", "num_blocks", "add_cross_attention", "add_self_attention"):
            value = getattr(self, name)
            if isinstance(value, (bool, int)):
                value = (value,) * levels
            object.__setattr__(self, name, tuple(value))
        _validate(self)

    @property
    def levels(self) -> int:
        return len(self.dim_mult)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.dim_mult)

    @property
    def downsample_factor(self) -> int:
        """Latent sides must be multiples of this: 2 ** (levels - 1)."""
        return 2 ** (self.levels - 1)

    @classmethod
    def kandinsky3(cls) -> "UNetConfig":
        """The released base / Flash U-Net (3,038,562,820 parameters)."""
        return cls()

    @classmethod
    def kandinsky3_inpainting(cls) -> "UNetConfig":
        """The released inpainting U-Net: input [x_t (4), keep-mask (1), masked latent (4)]."""
        return cls(num_channels=9)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        """Build from a dict (e.g. ``config.json``); unknown or missing keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(
                f"UNetConfig: unknown keys {unknown} and missing keys {missing}; "
                f"expected exactly {sorted(names)}"
            )
        return cls(**data)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
        """Translate a diffusers ``Kandinsky3UNet`` config (its ``unet/config.json``).

        diffusers hard-codes the ratios and the 4-entry attention flags, derives
        ``init_channels`` as ``block_out_channels[0] // 2`` and ties out to in channels.
        """
        widths = list(config.get("block_out_channels", (384, 768, 1536, 3072)))
        base = widths[0]
        if any(w % base for w in widths):
            raise ValueError(f"block_out_channels {widths} are not multiples of their first entry")
        layers = config.get("layers_per_block", 3)
        cross_dim = config.get("cross_attention_dim", 4096)
        if not isinstance(cross_dim, int):
            raise ValueError("per-level cross_attention_dim is not supported by Kandinsky 3")
        levels = len(widths)
        if levels > 4:
            raise ValueError(
                f"diffusers' Kandinsky3UNet supports at most 4 levels, got block_out_channels {widths}"
            )
        in_channels = config.get("in_channels", 4)
        return cls(
            model_channels=base,
            init_channels=base // 2,
            num_channels=in_channels,
            out_channels=in_channels,
            time_embed_dim=config.get("time_embedding_dim", 1536),
            context_dim=cross_dim,
            groups=config.get("groups", 32),
            head_dim=config.get("attention_head_dim", 64),
            dim_mult=tuple(w // base for w in widths),
            num_blocks=(layers,) * max(levels, 4) if isinstance(layers, int) else tuple(layers),
        )


class ResNetPlan(NamedTuple):
    """Channels of one bottleneck residual block; resample is None, "up" or "down"."""

    in_channels: int
    out_channels: int
    resample: str | None = None


class TriplePlan(NamedTuple):
    """One [ResNet, cross-attention (width or None), ResNet] triple."""

    resnet_in: ResNetPlan
    cross_attention: int | None
    resnet_out: ResNetPlan


class LevelPlan(NamedTuple):
    """One level of the down or up path; self_attention is its width or None."""

    self_attention: int | None
    triples: tuple[TriplePlan, ...]


def plan_levels(config: UNetConfig) -> tuple[list[LevelPlan], list[LevelPlan]]:
    """The exact channel plan (architecture §2.7) of the down levels and the up levels.

    Down level L maps dims[L] -> dims[L+1] (self-attention on the input width first);
    up level l maps dims[n-l] (+ the skip width for l >= 1) -> dims[n-1-l] (self-attention on
    the output width last).  ``num_blocks = 1`` gives one triple that maps straight to the
    output width (the original and diffusers build a broken network there).
    """
    n = config.levels
    dims = [config.init_channels] + list(config.block_out_channels)
    down_flags = zip(config.num_blocks, config.add_cross_attention, config.add_self_attention)
    up_flags = zip(
        config.num_blocks[::-1], config.add_cross_attention[::-1], config.add_self_attention[::-1]
    )
    down: list[LevelPlan] = []
    for level, (blocks, cross, self_attn) in zip(range(n), down_flags):
        d_in, d_out = dims[level], dims[level + 1]
        triples = []
        for i in range(blocks):
            resample = "down" if (level != n - 1 and i == blocks - 1) else None
            triples.append(
                TriplePlan(
                    ResNetPlan(d_in if i == 0 else d_out, d_out),
                    d_out if cross else None,
                    ResNetPlan(d_out, d_out, resample),
                )
            )
        down.append(LevelPlan(d_in if self_attn else None, tuple(triples)))
    up: list[LevelPlan] = []
    for level, (blocks, cross, self_attn) in zip(range(n), up_flags):
        d_in, d_out = dims[n - level], dims[n - 1 - level]
        skip = dims[n - level] if level != 0 else 0
        if blocks == 1:
            pairs = [(d_in + skip, d_out)]
        else:
            pairs = [(d_in + skip, d_in)] + [(d_in, d_in)] * (blocks - 2) + [(d_in, d_out)]
        triples = []
        for i, (a, b) in enumerate(pairs):
            resample = "up" if (level != 0 and i == 0) else None
            triples.append(
                TriplePlan(ResNetPlan(a, a, resample), a if cross else None, ResNetPlan(a, b))
            )
        up.append(LevelPlan(d_out if self_attn else None, tuple(triples)))
    return down, up


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _validate(config: UNetConfig) -> None:
    """Reject configs that cannot build a working network, naming the offending value."""
    positive = (
        "model_channels", "init_channels", "num_channels", "out_channels", "time_embed_dim",
        "context_dim", "groups", "head_dim", "expansion_ratio", "compression_ratio",
    )
    for name in positive:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}")
    n = config.levels
    if n < 1:
        raise ValueError("UNetConfig.dim_mult must name at least one level")
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in config.dim_mult):
        raise ValueError(f"UNetConfig.dim_mult must hold positive ints, got {config.dim_mult}")
    for name in ("num_blocks", "add_cross_attention", "add_self_attention"):
        if len(getattr(config, name)) < n:
            raise ValueError(
                f"UNetConfig.{name} has {len(getattr(config, name))} entries but dim_mult "
                f"has {n} levels; give at least one entry per level"
            )
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in config.num_blocks):
        raise ValueError(f"UNetConfig.num_blocks must hold ints >= 1, got {config.num_blocks}")
    down, up = plan_levels(config)
    norm_widths = {config.init_channels}
    attention_widths = {config.time_embed_dim: "time_embed_dim (attention pooling)"}
    for path, levels in (("down", down), ("up", up)):
        for index, level in enumerate(levels):
            if level.self_attention is not None:
                norm_widths.add(level.self_attention)
                attention_widths[level.self_attention] = f"{path} level {index} self-attention"
            for triple in level.triples:
                for res in (triple.resnet_in, triple.resnet_out):
                    hidden = max(res.in_channels, res.out_channels) // config.compression_ratio
                    if hidden < 1:
                        raise ValueError(
                            f"compression_ratio {config.compression_ratio} leaves a {path} level "
                            f"{index} bottleneck with no channels"
                        )
                    norm_widths.update((res.in_channels, hidden))
                if triple.cross_attention is not None:
                    norm_widths.add(triple.cross_attention)
                    attention_widths[triple.cross_attention] = f"{path} level {index} cross-attention"
    bad = sorted(w for w in norm_widths if w % config.groups)
    if bad:
        raise ValueError(
            f"UNetConfig.groups={config.groups} does not divide the norm widths {bad}; "
            "choose groups dividing init_channels, every level width and every bottleneck width"
        )
    for width, where in sorted(attention_widths.items()):
        if width % config.head_dim:
            raise ValueError(
                f"UNetConfig.head_dim={config.head_dim} does not divide the width {width} of the "
                f"{where}; every attention width must be a multiple of head_dim"
            )
