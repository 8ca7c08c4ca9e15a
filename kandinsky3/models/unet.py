"""The Kandinsky 3 U-Net: bottleneck residual blocks, conditional GroupNorm, self- and
cross-attention, and an attention-pooled text vector added to the time embedding.

References: docs/architecture.md §2 (architecture, key names); "Kandinsky 3.0 Technical Report",
arXiv 2312.03511.  Attribute names are the checkpoint format: ``UNet(config).state_dict()``
has exactly the keys of the ``unet`` entry of the original ``kandinsky3.pt``
(architecture §2.10), so the released weights load with ``strict=True`` and no renaming.

The network is ``unet(x, t, context, mask) -> ε``.  For a sampling run, :meth:`UNet.bind` fixes the text and
the timestep list and returns ``bound(x, t) -> ε``, which precomputes what depends only on them.

Conventions used throughout:
    B batch, C channels, H/W latent height/width, L text tokens, T time-embedding width,
    nh heads, hd head size (``config.head_dim``).  Text masks are (B, L) with
    1/True = real token.  The timestep is the integer diffusion step in [0, 999]
    (given as float or int).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .unet_config import LevelPlan, ResNetPlan, UNetConfig, plan_levels

__all__ = ["UNet", "UNetConfig", "BoundUNet", "ModulationTable", "Modulation", "masked_attention"]


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA over (B, nh, Lq, hd) query and (B, nh, Lk, hd) key/value with a (B, Lk) bool key mask.

    Matches the original's masking, which fills masked logits with the dtype's most negative
    finite value: masked keys get zero weight, and a sample whose keys are *all* masked gets a
    uniform softmax, i.e. the mean of the values.  The boolean mask keeps this finite and
    exact in fp16/bf16 (no -10000 bias, no -inf rows).
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(query, key, value)
    has_key = key_mask.any(dim=1)  # (B,)
    attend = (key_mask | ~has_key[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attend)
    uniform = value.mean(dim=2, keepdim=True)  # (B, nh, 1, hd)
    return torch.where(has_key[:, None, None, None], out, uniform)


class Attention(nn.Module):
    """Multi-head attention without biases (architecture §2.6): queries from x (width ``query_width``),
    keys/values from a context (width ``context_width``), all projected to ``width``;
    heads = width // head_dim, scale head_dim ** -0.5, output Linear(width → width)."""

    def __init__(self, query_width: int, context_width: int, width: int, head_dim: int):
        super().__init__()
        self.heads = width // head_dim
        self.to_query = nn.Linear(query_width, width, bias=False)
        self.to_key = nn.Linear(context_width, width, bias=False)
        self.to_value = nn.Linear(context_width, width, bias=False)
        self.output_layer = nn.Linear(width, width, bias=False)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, Lq, query_width), context (B, Lk, context_width), key_mask (B, Lk) bool → (B, Lq, width)."""
        batch = x.shape[0]

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, nh*hd) -> (B, nh, L, hd)
            return t.view(batch, t.shape[1], self.heads, -1).transpose(1, 2)

        q = heads(self.to_query(x))
        k = heads(self.to_key(context))
        v = heads(self.to_value(context))
        out = masked_attention(q, k, v, key_mask)  # (B, nh, Lq, hd)
        out = out.transpose(1, 2).reshape(batch, x.shape[1], -1)  # (B, Lq, nh*hd)
        return self.output_layer(out)


Modulation = Callable[["ConditionalGroupNorm"], torch.Tensor]
"""What the conditional norms of one network call read: ``modulation(norm)`` is that norm's [scale; shift], (B, 2·C).

Two sources: the norm's own projection of the time embedding, Linear(SiLU(τ)), computed inside the norm's call
(:meth:`UNet.forward`; inside, so a sharded block has its weights gathered), or a row of a :class:`ModulationTable`
precomputed for a sampling run (:class:`BoundUNet`)."""


class ConditionalGroupNorm(nn.Module):
    """GN(x)·(1 + s) + b with [s; b] = Linear(SiLU(τ)) (architecture §2.4).

    The affine-free GroupNorm has eps 1e-5.  The projection (key ``context_mlp.1``) is
    zero-initialised, so every norm starts as a plain GroupNorm.  ``index`` is the norm's
    position in its U-Net (its entry in a :class:`ModulationTable`).
    """

    def __init__(self, groups: int, channels: int, time_embed_dim: int):
        super().__init__()
        self.groups = groups
        self.index = 0
        self.context_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 2 * channels))
        nn.init.zeros_(self.context_mlp[1].weight)
        nn.init.zeros_(self.context_mlp[1].bias)

    def forward(self, x: torch.Tensor, modulation: Modulation) -> torch.Tensor:
        """x (B, C, H, W) → GN(x)·(1 + scale) + shift (B, C, H, W), [scale; shift] = ``modulation(self)`` (B, 2C)."""
        scale, shift = modulation(self)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return torch.addcmul(shift, F.group_norm(x, self.groups, eps=1e-5), scale + 1.0)


class Block(nn.Module):
    """CondGN → SiLU → [ConvTranspose 2×2 up] → Conv → [Conv 2×2 stride-2 down]."""

    def __init__(self, config: UNetConfig, c_in: int, c_out: int, kernel: int, resample: str | None):
        super().__init__()
        self.group_norm = ConditionalGroupNorm(config.groups, c_in, config.time_embed_dim)
        self.up_sample = nn.ConvTranspose2d(c_in, c_in, 2, stride=2) if resample == "up" else None
        self.projection = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        self.down_sample = nn.Conv2d(c_out, c_out, 2, stride=2) if resample == "down" else None

    def forward(self, x: torch.Tensor, modulation: Modulation) -> torch.Tensor:
        x = F.silu(self.group_norm(x, modulation))
        if self.up_sample is not None:
            x = self.up_sample(x)
        x = self.projection(x)
        if self.down_sample is not None:
            x = self.down_sample(x)
        return x


class ResNetBlock(nn.Module):
    """Bottleneck residual block R(in → out) (architecture §2.5): 1×1, 3×3, 3×3, 1×1 sub-blocks at
    hidden width max(in, out) // compression_ratio; up-sampling in sub-block 1 (before its
    conv), down-sampling in sub-block 2 (after its conv); learned resampling shortcut."""

    def __init__(self, config: UNetConfig, plan: ResNetPlan):
        super().__init__()
        c_in, c_out, resample = plan
        hidden = max(c_in, c_out) // config.compression_ratio
        self.resnet_blocks = nn.ModuleList(
            [
                Block(config, c_in, hidden, 1, None),
                Block(config, hidden, hidden, 3, "up" if resample == "up" else None),
                Block(config, hidden, hidden, 3, "down" if resample == "down" else None),
                Block(config, hidden, c_out, 1, None),
            ]
        )
        self.shortcut_up_sample = nn.ConvTranspose2d(c_in, c_in, 2, stride=2) if resample == "up" else None
        self.shortcut_projection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.shortcut_down_sample = nn.Conv2d(c_out, c_out, 2, stride=2) if resample == "down" else None

    def forward(self, x: torch.Tensor, modulation: Modulation) -> torch.Tensor:
        out = x
        for block in self.resnet_blocks:
            out = block(out, modulation)
        for shortcut in (self.shortcut_up_sample, self.shortcut_projection, self.shortcut_down_sample):
            if shortcut is not None:
                x = shortcut(x)
        return x + out


class AttentionBlock(nn.Module):
    """x + Attn(CondGN(x)), then x + FFN(CondGN(x)) (architecture §2.6).

    Self-attention when ``context_width`` is None; otherwise cross-attention to the text.
    """

    def __init__(self, config: UNetConfig, width: int, context_width: int | None):
        super().__init__()
        self.in_norm = ConditionalGroupNorm(config.groups, width, config.time_embed_dim)
        self.attention = Attention(width, context_width or width, width, config.head_dim)
        self.out_norm = ConditionalGroupNorm(config.groups, width, config.time_embed_dim)
        hidden = config.expansion_ratio * width
        self.feed_forward = nn.Sequential(
            nn.Conv2d(width, hidden, 1, bias=False), nn.SiLU(), nn.Conv2d(hidden, width, 1, bias=False)
        )

    def forward(
        self,
        x: torch.Tensor,
        modulation: Modulation,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.in_norm(x, modulation).flatten(2).transpose(1, 2)  # (B, H*W, C)
        if context is None:
            out = self.attention(tokens, tokens)
        else:
            out = self.attention(tokens, context, context_mask)
        x = x + out.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.feed_forward(self.out_norm(x, modulation))


class AttentionPooling(nn.Module):
    """Pools the text into a (B, T) vector: the unmasked mean of the context queries the
    masked context (architecture §2.3; the original class is named ``AttentionPolling``)."""

    def __init__(self, time_embed_dim: int, context_dim: int, head_dim: int):
        super().__init__()
        self.attention = Attention(context_dim, context_dim, time_embed_dim, head_dim)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """context (B, L, context_dim), context_mask (B, L) bool → (B, T)."""
        query = context.mean(dim=1, keepdim=True)  # (B, 1, context_dim): pads take part
        return self.attention(query, context, context_mask).squeeze(1)


class Triple(nn.ModuleList):
    """[ResNet, cross-attention or Identity, ResNet] — keys ``{i}.0``, ``{i}.1``, ``{i}.2``."""

    def __init__(self, config: UNetConfig, plan):
        attention = (
            AttentionBlock(config, plan.cross_attention, config.context_dim)
            if plan.cross_attention is not None
            else nn.Identity()
        )
        super().__init__([ResNetBlock(config, plan.resnet_in), attention, ResNetBlock(config, plan.resnet_out)])

    def forward(self, x, modulation: Modulation, context, context_mask):
        resnet_in, attention, resnet_out = self
        x = resnet_in(x, modulation)
        if isinstance(attention, AttentionBlock):
            x = attention(x, modulation, context, context_mask)
        return resnet_out(x, modulation)


class Level(nn.Module):
    """One level of the down path (self-attention first) or up path (self-attention last)."""

    def __init__(self, config: UNetConfig, plan: LevelPlan, self_attention_first: bool):
        super().__init__()
        self.self_attention_first = self_attention_first
        if plan.self_attention is not None:
            self.self_attention_block = AttentionBlock(config, plan.self_attention, None)
        else:
            self.self_attention_block = None
        self.resnet_attn_blocks = nn.ModuleList([Triple(config, t) for t in plan.triples])

    def forward(self, x, modulation: Modulation, context, context_mask):
        if self.self_attention_first and self.self_attention_block is not None:
            x = self.self_attention_block(x, modulation)
        for triple in self.resnet_attn_blocks:
            x = triple(x, modulation, context, context_mask)
        if not self.self_attention_first and self.self_attention_block is not None:
            x = self.self_attention_block(x, modulation)
        return x


def timestep_sinusoid(time: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) timesteps → (B, width) fp32 [sin(t·f_i), cos(t·f_i)], f_i = 10000^(−i/(width/2 − 1)).

    Sine first (architecture §2.2).  The fp32 operation order, (−ln 10000 · i) / (half − 1), is the
    one diffusers uses; the original's order differs in the last bit of some frequencies,
    which a 999·ulp angle error makes visible (~1e-5) at the output of a random network.
    """
    half = width // 2
    exponent = -math.log(10000.0) * torch.arange(half, device=time.device, dtype=torch.float32)
    freqs = torch.exp(exponent / max(half - 1, 1))
    angles = time.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class UNet(nn.Module):
    """Kandinsky 3 U-Net: predicts ε from (x_t, t, projected text context, text mask)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        down, up = plan_levels(config)
        # Index 0 (sinusoid) and 2 (SiLU) hold no weights: keys to_time_embed.{1,3}.*
        self.to_time_embed = nn.Sequential(
            nn.Identity(),
            nn.Linear(config.init_channels, config.time_embed_dim),
            nn.SiLU(),
            nn.Linear(config.time_embed_dim, config.time_embed_dim),
        )
        self.feature_pooling = AttentionPooling(config.time_embed_dim, config.context_dim, config.head_dim)
        self.in_layer = nn.Conv2d(config.num_channels, config.init_channels, 3, padding=1)
        self.down_samples = nn.ModuleList([Level(config, plan, True) for plan in down])
        self.up_samples = nn.ModuleList([Level(config, plan, False) for plan in up])
        self.out_layer = nn.Sequential(
            nn.GroupNorm(config.groups, config.init_channels),
            nn.SiLU(),
            nn.Conv2d(config.init_channels, config.out_channels, 3, padding=1),
        )
        self._norms = [module for module in self.modules() if isinstance(module, ConditionalGroupNorm)]
        for index, norm in enumerate(self._norms):
            norm.index = index

    def forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor | float | int,
        context: torch.Tensor,
        context_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Predict ε.

        Args:
            x: (B, num_channels, H, W) noisy latents; H and W multiples of 2 ** (levels − 1).
            time: diffusion step(s) in [0, 999]: a number, a 0-d tensor or a (B,) / (1,) tensor.
            context: (B, L, context_dim) text context, already projected (Linear + LayerNorm).
            context_mask: (B, L) bool or 0/1, 1 = real token.

        Returns:
            (B, out_channels, H, W) ε in the model's dtype.
        """
        context, context_mask = self._check_context(context, context_mask, x.shape[0])
        x, time = self._check_latents(x, time, context.shape[0])
        time_embed = self._timestep_embed(time) + self.feature_pooling(context, context_mask)  # τ (B, T)
        return self._predict(x, context, context_mask, lambda norm: norm.context_mlp(time_embed))

    def _predict(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, modulation: Modulation
    ) -> torch.Tensor:
        """The network body on checked inputs: (B, C_in, H, W) latents → (B, C_out, H, W) ε."""
        x = self.in_layer(x)
        skips = []
        for index, level in enumerate(self.down_samples):
            x = level(x, modulation, context, context_mask)
            if index != len(self.down_samples) - 1:
                skips.append(x)
        for index, level in enumerate(self.up_samples):
            if index != 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = level(x, modulation, context, context_mask)
        return self.out_layer(x)

    def _timestep_embed(self, time: torch.Tensor) -> torch.Tensor:
        """MLP(sinusoid(t)): (N,) timesteps → (N, T) in the model's dtype."""
        sinusoid = timestep_sinusoid(time, self.config.init_channels)
        return self.to_time_embed(sinusoid.to(self.in_layer.weight.dtype))

    @property
    def modulation_width(self) -> int:
        """Σ 2·C over the conditional norms: the values per image and timestep of a :class:`ModulationTable`."""
        return sum(norm.context_mlp[1].out_features for norm in self._norms)

    def bind(
        self,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        timesteps: Sequence[int] | None = None,
        *,
        max_table_bytes: int | None = None,
    ) -> BoundUNet:
        """This U-Net with one (B, L, D) text context and its (B, L) mask bound, for a sampling run over ``timesteps``.

        A sampler calls the U-Net with the same context at a known list of timesteps. The conditional norms'
        projections (0.81B of the 3.04B released parameters, ~27 %) are matrix-vector products at every call,
        bound by reading their weights; the binding computes them for all S timesteps in one pass
        (a :class:`ModulationTable`), so each weight is read once per sampling run instead of once per step.
        The table holds S·B·``modulation_width`` values (about 210 MB in fp32 for the released model, 50 steps,
        B = 2); when that exceeds ``max_table_bytes`` (None = no limit) no table is built and every call
        computes them. Calls at timesteps outside the table are plain :meth:`forward` calls.
        """
        context, context_mask = self._check_context(context, context_mask)
        timesteps = tuple(int(t) for t in timesteps or ())
        if len(set(timesteps)) != len(timesteps):
            raise ValueError(f"timesteps must be distinct, got {timesteps}")
        dtype = self.in_layer.weight.dtype
        size = len(timesteps) * context.shape[0] * self.modulation_width * dtype.itemsize
        table = None
        if timesteps and (max_table_bytes is None or size <= max_table_bytes):
            table = self._modulation_table(timesteps, context, context_mask)
        return BoundUNet(self, context, context_mask, table)

    def _modulation_table(
        self, timesteps: tuple[int, ...], context: torch.Tensor, context_mask: torch.Tensor
    ) -> ModulationTable:
        """Every conditional norm's [scale; shift] for each of S ``timesteps`` and this checked context, at once."""
        time = torch.tensor(timesteps, device=context.device)  # (S,)
        with torch.no_grad():
            pooled = self.feature_pooling(context, context_mask)  # (B, T)
            time_part = self._timestep_embed(time)  # (S, T)
            activated = F.silu(time_part[:, None, :] + pooled[None, :, :]).flatten(0, 1)  # (S·B, T)
            shape = (len(timesteps), context.shape[0])
            outputs = tuple(norm.context_mlp[1](activated).unflatten(0, shape) for norm in self._norms)
        return ModulationTable(timesteps, outputs)

    def _check_context(
        self, context: torch.Tensor, context_mask: torch.Tensor, batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The context in the model's dtype and the mask as bool on its device; errors say what to pass instead."""
        cfg = self.config
        if context is None or context_mask is None:
            raise ValueError("UNet needs a text context and its mask (use the null embedding for no text)")
        batch = context.shape[0] if batch is None else batch
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.context_dim:
            raise ValueError(
                f"context must be (B={batch}, L, {cfg.context_dim}) projected text, got {tuple(context.shape)}"
            )
        if tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"context_mask must be (B, L) = {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
            )
        if context_mask.dtype != torch.bool:
            if context_mask.is_floating_point() and not torch.all((context_mask == 0) | (context_mask == 1)):
                raise ValueError("context_mask must hold only 0 and 1 (1 = real token)")
            context_mask = context_mask != 0
        return context.to(self.in_layer.weight.dtype), context_mask.to(context.device)

    def _check_latents(
        self, x: torch.Tensor, time: torch.Tensor | float | int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents in the model's dtype and the time as a (B,) tensor, for a text context of batch ``batch``."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.num_channels:
            raise ValueError(
                f"UNet expects latents of shape (B, {cfg.num_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = cfg.downsample_factor
        height, width = x.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"latent sides must be multiples of {factor} (image sides multiples of {8 * factor} "
                f"for the 8x MoVQ), got a {height}x{width} latent"
            )
        if x.shape[0] != batch:
            raise ValueError(f"latents of batch {x.shape[0]} for a text context of batch {batch}")
        time = torch.as_tensor(time, device=x.device)
        if time.ndim == 0:
            time = time[None]
        if time.ndim != 1 or time.shape[0] not in (1, batch):
            raise ValueError(f"time must be a number or a (B,) tensor with B={batch}, got {tuple(time.shape)}")
        return x.to(self.in_layer.weight.dtype), time.expand(batch)


@dataclass(frozen=True, eq=False)
class ModulationTable:
    """Every conditional norm's [scale; shift] for S timesteps and one text context of batch B.

    ``outputs[k]`` is (S, B, 2·C_k) for the k-th :class:`ConditionalGroupNorm` (module order), row i for
    timestep ``timesteps[i]``. Built by :meth:`UNet.bind`.
    """

    timesteps: tuple[int, ...]
    outputs: tuple[torch.Tensor, ...]

    def modulation(self, time: torch.Tensor) -> Modulation | None:
        """The norms' inputs for a (B,) ``time`` whose entries are all one of the table's timesteps; None otherwise."""
        first = int(time[0])
        if first not in self.timesteps or not bool((time == first).all()):
            return None
        row = self.timesteps.index(first)
        return lambda norm: self.outputs[norm.index][row]


@dataclass(frozen=True, eq=False)
class BoundUNet:
    """A U-Net with its text bound for one sampling run: ``bound(x, t) -> ε`` (built by :meth:`UNet.bind`).

    x (B, num_channels, H, W) latents and t a number or a (B,) tensor of timesteps, as :meth:`UNet.forward`;
    the context (B, L, D) and mask (B, L) are the bound ones. At a timestep of the ``table`` the conditional
    norms read their precomputed row; at any other one (or without a table) this is ``unet(x, t, context, mask)``.
    """

    unet: UNet
    context: torch.Tensor
    context_mask: torch.Tensor
    table: ModulationTable | None

    def __call__(self, x: torch.Tensor, time: torch.Tensor | float | int) -> torch.Tensor:
        x, time = self.unet._check_latents(x, time, self.context.shape[0])
        modulation = None if self.table is None else self.table.modulation(time)
        if modulation is None:
            return self.unet(x, time, self.context, self.context_mask)
        return self.unet._predict(x, self.context, self.context_mask, modulation)
