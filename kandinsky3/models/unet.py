"""The Kandinsky 3 U-Net: bottleneck residual blocks, conditional GroupNorm, self- and
cross-attention, and an attention-pooled text vector added to the time embedding.

References: SPEC §2 (architecture, key names); "Kandinsky 3.0 Technical Report",
arXiv 2312.03511.  Attribute names are the checkpoint format: ``UNet(config).state_dict()``
has exactly the keys of the ``unet`` entry of the original ``kandinsky3.pt``
(SPEC §2.10), so the released weights load with ``strict=True`` and no renaming.

Conventions used throughout:
    B batch, C channels, H/W latent height/width, L text tokens, T time-embedding width,
    nh heads, hd head size (``config.head_dim``).  Text masks are (B, L) with
    1/True = real token.  The timestep is the integer diffusion step in [0, 999]
    (given as float or int).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .unet_config import LevelPlan, ResNetPlan, UNetConfig, plan_levels

__all__ = ["UNet", "UNetConfig", "ModulationTable", "masked_attention"]


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
    """Multi-head attention without biases (SPEC §2.6): queries from x (width ``query_width``),
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


@dataclass
class ModulationTable:
    """Every conditional norm's ``Linear(SiLU(τ))`` for a list of timesteps and one text context.

    ``outputs[k]`` is (S, B, 2·C_k) for the k-th :class:`ConditionalGroupNorm` (module order), row i for
    timestep ``timesteps[i]``. Built by :meth:`UNet.modulation_table`.
    """

    timesteps: tuple[int, ...]
    outputs: list[torch.Tensor]
    batch: int
    rows: dict[int, int] = field(init=False)  # timestep -> row

    def __post_init__(self):
        self.rows = {t: i for i, t in enumerate(self.timesteps)}

    def row_of(self, time: torch.Tensor) -> int | None:
        """The row for a (B,) ``time`` whose entries are all one of the table's timesteps; None otherwise."""
        first = int(time[0])
        if time.shape[0] != self.batch or first not in self.rows or not bool((time == first).all()):
            return None
        return self.rows[first]


class NormInput(NamedTuple):
    """What the conditional norms of one forward call read: the time embedding τ (B, T), or row ``step`` of a
    precomputed :class:`ModulationTable` (then ``time_embed`` is None)."""

    time_embed: torch.Tensor | None
    table: ModulationTable | None = None
    step: int = 0


class ConditionalGroupNorm(nn.Module):
    """GN(x)·(1 + s) + b with [s; b] = Linear(SiLU(τ)) (SPEC §2.4).

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

    def forward(self, x: torch.Tensor, time_embed: NormInput) -> torch.Tensor:
        """x (B, C, H, W), time_embed: τ (B, T) or a table row → (B, C, H, W)."""
        if time_embed.table is None:
            projected = self.context_mlp(time_embed.time_embed)  # (B, 2C)
        else:
            projected = time_embed.table.outputs[self.index][time_embed.step]
        scale, shift = projected[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1)
        return torch.addcmul(shift, F.group_norm(x, self.groups, eps=1e-5), scale + 1.0)


class Block(nn.Module):
    """CondGN → SiLU → [ConvTranspose 2×2 up] → Conv → [Conv 2×2 stride-2 down]."""

    def __init__(self, config: UNetConfig, c_in: int, c_out: int, kernel: int, resample: str | None):
        super().__init__()
        self.group_norm = ConditionalGroupNorm(config.groups, c_in, config.time_embed_dim)
        self.up_sample = nn.ConvTranspose2d(c_in, c_in, 2, stride=2) if resample == "up" else None
        self.projection = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        self.down_sample = nn.Conv2d(c_out, c_out, 2, stride=2) if resample == "down" else None

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.group_norm(x, time_embed))
        if self.up_sample is not None:
            x = self.up_sample(x)
        x = self.projection(x)
        if self.down_sample is not None:
            x = self.down_sample(x)
        return x


class ResNetBlock(nn.Module):
    """Bottleneck residual block R(in → out) (SPEC §2.5): 1×1, 3×3, 3×3, 1×1 sub-blocks at
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

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        out = x
        for block in self.resnet_blocks:
            out = block(out, time_embed)
        for shortcut in (self.shortcut_up_sample, self.shortcut_projection, self.shortcut_down_sample):
            if shortcut is not None:
                x = shortcut(x)
        return x + out


class AttentionBlock(nn.Module):
    """x + Attn(CondGN(x)), then x + FFN(CondGN(x)) (SPEC §2.6).

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
        time_embed: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.in_norm(x, time_embed).flatten(2).transpose(1, 2)  # (B, H*W, C)
        if context is None:
            out = self.attention(tokens, tokens)
        else:
            out = self.attention(tokens, context, context_mask)
        x = x + out.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.feed_forward(self.out_norm(x, time_embed))


class AttentionPooling(nn.Module):
    """Pools the text into a (B, T) vector: the unmasked mean of the context queries the
    masked context (SPEC §2.3; the original class is named ``AttentionPolling``)."""

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

    def forward(self, x, time_embed, context, context_mask):
        resnet_in, attention, resnet_out = self
        x = resnet_in(x, time_embed)
        if isinstance(attention, AttentionBlock):
            x = attention(x, time_embed, context, context_mask)
        return resnet_out(x, time_embed)


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

    def forward(self, x, time_embed, context, context_mask):
        if self.self_attention_first and self.self_attention_block is not None:
            x = self.self_attention_block(x, time_embed)
        for triple in self.resnet_attn_blocks:
            x = triple(x, time_embed, context, context_mask)
        if not self.self_attention_first and self.self_attention_block is not None:
            x = self.self_attention_block(x, time_embed)
        return x


def timestep_sinusoid(time: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) timesteps → (B, width) fp32 [sin(t·f_i), cos(t·f_i)], f_i = 10000^(−i/(width/2 − 1)).

    Sine first (SPEC §2.2).  The fp32 operation order, (−ln 10000 · i) / (half − 1), is the
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
        modulation: ModulationTable | None = None,
    ) -> torch.Tensor:
        """Predict ε.

        Args:
            x: (B, num_channels, H, W) noisy latents; H and W multiples of 2 ** (levels − 1).
            time: diffusion step(s) in [0, 999]: a number, a 0-d tensor or a (B,) / (1,) tensor.
            context: (B, L, context_dim) text context, already projected (Linear + LayerNorm).
            context_mask: (B, L) bool or 0/1, 1 = real token.
            modulation: the conditional norms' inputs precomputed by :meth:`modulation_table` for this
                context and mask (the caller vouches for that); ``time`` must be one of its timesteps.

        Returns:
            (B, out_channels, H, W) ε in the model's dtype.
        """
        time, context_mask = self._check_inputs(x, time, context, context_mask)
        dtype = self.in_layer.weight.dtype
        x, context = x.to(dtype), context.to(dtype)

        if modulation is None:
            time_embed = NormInput(self._time_embed(time, context, context_mask))
        else:
            time_embed = NormInput(None, modulation, self._table_row(modulation, time))

        x = self.in_layer(x)
        skips = []
        for index, level in enumerate(self.down_samples):
            x = level(x, time_embed, context, context_mask)
            if index != len(self.down_samples) - 1:
                skips.append(x)
        for index, level in enumerate(self.up_samples):
            if index != 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = level(x, time_embed, context, context_mask)
        return self.out_layer(x)

    def _time_embed(self, time: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """τ = MLP(sinusoid(t)) + AttentionPooling(context): (B,) times, (B, L, D) context → (B, T)."""
        return self._timestep_embed(time) + self.feature_pooling(context.to(self.in_layer.weight.dtype), context_mask)

    def _timestep_embed(self, time: torch.Tensor) -> torch.Tensor:
        """MLP(sinusoid(t)): (N,) timesteps → (N, T) in the model's dtype."""
        sinusoid = timestep_sinusoid(time, self.config.init_channels)
        return self.to_time_embed(sinusoid.to(self.in_layer.weight.dtype))

    @property
    def modulation_width(self) -> int:
        """Σ 2·C over the conditional norms: the values per image and timestep of a :class:`ModulationTable`."""
        return sum(norm.context_mlp[1].out_features for norm in self._norms)

    def modulation_table(
        self, timesteps: Sequence[int], context: torch.Tensor, context_mask: torch.Tensor
    ) -> ModulationTable:
        """Every conditional norm's scale and shift for each of ``timesteps`` and this (B, L, D) context, at once.

        A sampler calls the U-Net with the same context at a known list of timesteps. The norms' projections
        (0.81B of the 3.04B released parameters, ~27 %) are matrix-vector products at every call, bound by
        reading their weights; done here for all S timesteps in one pass, each weight is read once per
        sampling run instead of once per step. Passing the table as ``modulation=`` to ``forward`` gives the
        per-call result up to matmul rounding. Memory: S·B·``modulation_width`` values (about 210 MB in fp32
        for the released model, 50 steps, B = 2).
        """
        timesteps = tuple(int(t) for t in timesteps)
        if not timesteps or len(set(timesteps)) != len(timesteps):
            raise ValueError(f"timesteps must be a non-empty list of distinct ints, got {timesteps}")
        batch = context.shape[0]
        if context.ndim != 3 or context.shape[2] != self.config.context_dim or context_mask.shape != context.shape[:2]:
            raise ValueError(f"context must be (B, L, {self.config.context_dim}) with a (B, L) mask, got "
                             f"{tuple(context.shape)} and {tuple(context_mask.shape)}")
        dtype = self.in_layer.weight.dtype
        time = torch.tensor(timesteps, device=context.device)  # (S,)
        with torch.no_grad():
            pooled = self.feature_pooling(context.to(dtype), context_mask.to(context.device) != 0)  # (B, T)
            time_part = self._timestep_embed(time)  # (S, T)
            activated = F.silu(time_part[:, None, :] + pooled[None, :, :]).flatten(0, 1)  # (S·B, T)
            outputs = [norm.context_mlp[1](activated).unflatten(0, (len(timesteps), batch)) for norm in self._norms]
        return ModulationTable(timesteps, outputs, batch)

    @staticmethod
    def _table_row(table: ModulationTable, time: torch.Tensor) -> int:
        """The table row of this call; a ValueError when the table does not cover it."""
        if time.shape[0] != table.batch:
            raise ValueError(f"the modulation table was built for batch {table.batch}, got {time.shape[0]}")
        row = table.row_of(time)
        if row is None:
            raise ValueError(f"the modulation table covers timesteps {table.timesteps}; got {time.tolist()}")
        return row

    def _check_inputs(self, x, time, context, context_mask):
        """Validate shapes early, with messages that say what to pass instead."""
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
        batch = x.shape[0]
        if context is None or context_mask is None:
            raise ValueError("UNet needs a text context and its mask (use the null embedding for no text)")
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
        time = torch.as_tensor(time, device=x.device)
        if time.ndim == 0:
            time = time[None]
        if time.ndim != 1 or time.shape[0] not in (1, batch):
            raise ValueError(f"time must be a number or a (B,) tensor with B={batch}, got {tuple(time.shape)}")
        return time.expand(batch), context_mask.to(x.device)
