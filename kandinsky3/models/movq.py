"""MoVQ autoencoder of Kandinsky 3 (Sber-MoVQGAN 270M): images (B,3,H,W) in [-1,1] <-> latents (B,4,H/8,W/8).

References:
- docs/architecture.md §3 (structure, encode/decode semantics, original key names) and §3.5 (diffusers names).
- Zheng et al., "MoVQ: Modulating Quantized Vectors for High-Fidelity Image Generation", arXiv 2209.09002
  (the spatially conditioned decoder norm, ``SpatialNorm``).
- Esser et al., "Taming Transformers", arXiv 2012.09841 (encoder/decoder layout, ResnetBlock, AttnBlock).
- van den Oord et al., "Neural Discrete Representation Learning", arXiv 1711.00937 (vector quantiser, EMA
  codebook in its appendix); Razavi et al., arXiv 1906.00446 (EMA update).

Attribute names reproduce the original ``movq.pt`` state-dict keys exactly (430 tensors for the released
model), so the original checkpoint loads with ``strict=True``. The released model has no codebook; the optional
``VectorQuantizer`` (``config.codebook_size > 0``) exists for training. ``encode``/``decode`` never quantise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

_GROUP_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MoVQConfig:
    """Architecture of the MoVQ autoencoder; field names follow the original ``generator_config``.

    Widths are ``ch * m`` for ``m`` in ``ch_mult``; level ``i`` works at ``resolution // 2**i`` and has
    self-attention iff that number is in ``attn_resolutions``. The spatial factor is ``2**(len(ch_mult)-1)``.
    ``codebook_size = 0`` builds no quantiser (the released model); ``> 0`` adds ``quantize`` with a
    ``(codebook_size, z_channels)`` codebook, optionally EMA-updated and with dead-code restarts.
    """

    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    resolution: int = 256
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False
    dropout: float = 0.0
    norm_groups: int = 32
    codebook_size: int = 0
    codebook_beta: float = 0.25
    codebook_ema: bool = False
    codebook_ema_decay: float = 0.99
    codebook_restart_after: int = 0

    def __post_init__(self) -> None:
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"MoVQConfig.{name} must be a tuple of ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("ch", "num_res_blocks", "resolution", "z_channels", "in_channels", "out_ch", "norm_groups"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("codebook_size", "codebook_restart_after"):
            _check_int(name, getattr(self, name), minimum=0)
        if not self.ch_mult:
            raise ValueError("MoVQConfig.ch_mult must have at least one level, got ()")
        for m in self.ch_mult:
            _check_int("ch_mult entry", m, minimum=1)
        for r in self.attn_resolutions:
            _check_int("attn_resolutions entry", r, minimum=1)
        self._check_semantics()

    def _check_semantics(self) -> None:
        if self.double_z is not False:
            raise ValueError("MoVQConfig.double_z=True (a KL posterior) is not supported by MoVQ; use double_z=False")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoVQConfig.dropout must be in [0, 1), got {self.dropout}")
        bad = [w for w in (self.ch, *self.widths) if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"MoVQConfig widths {bad} are not divisible by norm_groups={self.norm_groups}; "
                "choose ch/ch_mult so every width ch*m (and ch) is a multiple of norm_groups"
            )
        level_res = [self.resolution // 2**i for i in range(len(self.ch_mult))]
        unmatched = [r for r in self.attn_resolutions if r not in level_res]
        if unmatched:
            raise ValueError(
                f"MoVQConfig.attn_resolutions {unmatched} match no level; level resolutions are {level_res} "
                f"(resolution={self.resolution} halved per level)"
            )
        if self.codebook_beta < 0:
            raise ValueError(f"MoVQConfig.codebook_beta must be >= 0, got {self.codebook_beta}")
        if not 0.0 < self.codebook_ema_decay < 1.0:
            raise ValueError(f"MoVQConfig.codebook_ema_decay must be in (0, 1), got {self.codebook_ema_decay}")
        if self.codebook_size == 0 and (self.codebook_ema or self.codebook_restart_after):
            raise ValueError("codebook_ema / codebook_restart_after need a codebook: set codebook_size > 0")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each level, highest resolution first."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        """Spatial compression: image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    def has_attention(self, level: int) -> bool:
        """Whether level ``level`` (0 = highest resolution) has self-attention, encoder and decoder alike."""
        return self.resolution // 2**level in self.attn_resolutions

    @classmethod
    def kandinsky3(cls) -> "MoVQConfig":
        """The released 270M MoVQ of Kandinsky 3.0/3.1 (architecture §3.1), without a codebook."""
        return cls()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoVQConfig":
        """Inverse of ``to_dict``; raises ValueError naming unknown or missing keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"MoVQConfig.from_dict: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MoVQConfig.{name} must be an int >= {minimum}, got {value!r}")


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_GROUP_NORM_EPS, affine=True)


class PlainNorm(nn.Module):
    """Encoder norm: GroupNorm under ``.norm_layer`` (the original wrapper's key names); ignores ``zq``."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm_layer = _group_norm(channels, groups)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm_layer(x)


class SpatialNorm(nn.Module):
    """MoVQ decoder norm: GN(f) * conv_y(zq') + conv_b(zq'), zq' = nearest resize of zq to f's H×W.

    f: (B,C,H,W) features; zq: (B,z,h,w) latents (the raw decoder input, architecture §3.3). Returns (B,C,H,W).
    """

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = _group_norm(channels, groups)
        self.conv_y = nn.Conv2d(zq_channels, channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        if zq is None:
            raise ValueError("SpatialNorm needs the latent zq that conditions the decoder")
        (height, width), (h, w) = x.shape[-2:], zq.shape[-2:]
        if _lean() and height % h == 0 and width % w == 0:
            # Nearest upsampling by an integer factor repeats each latent pixel over a (fy, fx) patch, and a 1×1
            # conv acts per pixel, so conv(upsample(zq)) = upsample(conv(zq)): compute the scale and shift at the
            # latent size and broadcast them over the patches, in place (no full-size temporaries at all).
            fy, fx = height // h, width // w
            out = self.norm_layer(x)  # (B,C,H,W)
            patches = out.view(out.shape[0], out.shape[1], h, fy, w, fx)
            patches.mul_(self.conv_y(zq)[:, :, :, None, :, None]).add_(self.conv_b(zq)[:, :, :, None, :, None])
            return out
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")  # (B,z,H,W)
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


NormFactory = Callable[[int], nn.Module]


def _lean() -> bool:
    """In-place arithmetic is safe (no autograd graph to keep); it halves the decoder's peak at 512+ px."""
    return not torch.is_grad_enabled()


class ResnetBlock(nn.Module):
    """(B,in,H,W) -> (B,out,H,W): norm-SiLU-conv3x3, norm-SiLU-dropout-conv3x3, plus (1×1 nin_shortcut) input."""

    def __init__(self, in_channels: int, out_channels: int, make_norm: NormFactory, dropout: float):
        super().__init__()
        self.norm1 = make_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = make_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        lean = _lean()  # in-place activations and residual when nothing needs gradients (bit-identical)
        h = self.conv1(F.silu(self.norm1(x, zq), inplace=lean))
        h = self.conv2(self.dropout(F.silu(self.norm2(h, zq), inplace=lean)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut) if lean else shortcut + h


class AttnBlock(nn.Module):
    """(B,C,H,W) -> (B,C,H,W): single-head self-attention over all H·W positions, scale 1/sqrt(C), residual.

    q, k, v and proj_out are stored as 1×1 convs (original key layout) and applied as the equivalent linear maps
    on the (B,HW,C) tokens; the product runs in ``scaled_dot_product_attention``, so the (HW × HW) score matrix
    is never built here.
    """

    def __init__(self, channels: int, make_norm: NormFactory):
        super().__init__()
        self.norm = make_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x, zq).reshape(b, c, h * w).transpose(1, 2)  # (B,HW,C)
        # (B,1,HW,C): an explicit single-head axis keeps SDPA on its fused (flash / memory-efficient) kernels
        q, k, v = (_pointwise(conv, tokens).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q kᵀ/√C) v: (B,HW,C)
        return x + _pointwise(self.proj_out, out).transpose(1, 2).reshape(b, c, h, w)  # (B,C,H,W)


def _pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a 1×1 conv to (B,N,C_in) tokens as the equivalent linear map -> (B,N,C_out)."""
    return F.linear(tokens, conv.weight.view(conv.out_channels, conv.in_channels), conv.bias)  # (out,in,1,1)->(out,in)


class Downsample(nn.Module):
    """(B,C,H,W) -> (B,C,H/2,W/2): zero-pad right/bottom by 1, then 3×3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """(B,C,H,W) -> (B,C,2H,2W): nearest ×2, then 3×3 conv with padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, maybe empty) and a resampler.

    The resampler sits under ``downsample`` (encoder) or ``upsample`` (decoder), or is absent.
    """

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h, zq)
            if len(self.attn):
                h = self.attn[j](h, zq)
        return h


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at constant width (keys ``block_1``, ``attn_1``, ``block_2``)."""

    def __init__(self, channels: int, make_norm: NormFactory, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, make_norm, dropout)
        self.attn_1 = AttnBlock(channels, make_norm)
        self.block_2 = ResnetBlock(channels, channels, make_norm, dropout)

    def forward(self, h: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, zq), zq), zq)


class Encoder(nn.Module):
    """(B,in_channels,H,W) images -> (B,z_channels,H/f,W/f) pre-quant_conv features; plain GroupNorms."""

    def __init__(self, config: MoVQConfig):
        super().__init__()
        c = config

        def make_norm(channels: int) -> nn.Module:
            return PlainNorm(channels, c.norm_groups)

        self.conv_in = nn.Conv2d(c.in_channels, c.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        width = c.ch
        for i, out in enumerate(c.widths):
            blocks = [ResnetBlock(width if j == 0 else out, out, make_norm, c.dropout) for j in range(c.num_res_blocks)]
            attns = [AttnBlock(out, make_norm) for _ in blocks] if c.has_attention(i) else []
            level = Level(blocks, attns)
            if i != c.num_levels - 1:
                level.downsample = Downsample(out)
            self.down.append(level)
            width = out
        self.mid = MidBlock(width, make_norm, c.dropout)
        self.norm_out = make_norm(width)
        self.conv_out = nn.Conv2d(width, c.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B,z,h,w) post_quant_conv output, conditioned on zq (B,z,h,w) -> (B,out_ch,h·f,w·f); SpatialNorms.

    ``up[0]`` is the highest resolution; levels run from ``up[num_levels-1]`` down to ``up[0]``, each with
    ``num_res_blocks + 1`` ResnetBlocks.
    """

    def __init__(self, config: MoVQConfig):
        super().__init__()
        c = config

        def make_norm(channels: int) -> nn.Module:
            return SpatialNorm(channels, c.z_channels, c.norm_groups)

        width = c.widths[-1]
        self.conv_in = nn.Conv2d(c.z_channels, width, kernel_size=3, padding=1)
        self.mid = MidBlock(width, make_norm, c.dropout)
        levels: list[Level] = []
        for i in reversed(range(c.num_levels)):
            out = c.widths[i]
            n = c.num_res_blocks + 1
            blocks = [ResnetBlock(width if j == 0 else out, out, make_norm, c.dropout) for j in range(n)]
            attns = [AttnBlock(out, make_norm) for _ in blocks] if c.has_attention(i) else []
            level = Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(out)
            levels.insert(0, level)
            width = out
        self.up = nn.ModuleList(levels)
        self.norm_out = make_norm(width)
        self.conv_out = nn.Conv2d(width, c.out_ch, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(h), zq)
        for level in reversed(self.up):
            h = level(h, zq)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


def codebook_perplexity(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """exp(entropy) of the code histogram of ``indices`` (any shape, int64): 1 = one code, num_codes = uniform."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser for (B,D,h,w) latents, with straight-through gradients (training only).

    Loss: ``||sg(z) - q||² + beta·||z - sg(q)||²`` (means); with ``use_ema`` the codebook term is replaced by an
    EMA update of the codebook (decay ``ema_decay``) and the codebook gets no gradient. With
    ``restart_after > 0`` a code unused for that many training steps is re-initialised from a random encoder
    output of the current batch, drawn with the ``generator`` passed to ``forward``. Buffers:
    ``cluster_size`` (K,) EMA of assignment counts, ``embed_sum`` (K,D) EMA of assigned sums,
    ``steps_unused`` (K,) training steps since each code was last assigned. State updates run only in
    ``train()`` mode; single-process (no cross-rank reduction).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        beta: float = 0.25,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        restart_after: int = 0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.use_ema, self.ema_decay = beta, use_ema, ema_decay
        self.restart_after, self.eps = restart_after, eps
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        self.embedding.weight.requires_grad_(not use_ema)
        for name, value in self.initial_state(self.embedding.weight.detach()).items():
            self.register_buffer(name, value.clone())

    @staticmethod
    def initial_state(codebook: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh training statistics for a (K,D) codebook: one pseudo-assignment per code at its own value."""
        k = codebook.shape[0]
        ones = torch.ones(k, dtype=torch.float32, device=codebook.device)
        steps = torch.zeros(k, dtype=torch.long, device=codebook.device)
        return {"cluster_size": ones, "embed_sum": codebook.float(), "steps_unused": steps}

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N,D) vectors -> (N,) int64 index of the nearest code (squared Euclidean distance, in fp32)."""
        x, e = flat.float(), self.embedding.weight.float()
        dist = x.pow(2).sum(1, keepdim=True) - 2.0 * x @ e.t() + e.pow(2).sum(1)  # (N,K)
        return dist.argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,h,w) int64 indices -> (B,D,h,w) codebook vectors."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(
        self, z: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,D,h,w) -> (quantized (B,D,h,w) with straight-through gradient, scalar loss, indices (B,h,w))."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects (B,{self.dim},h,w) latents, got {tuple(z.shape)}")
        if self.training and self.restart_after > 0 and generator is None:
            raise ValueError("dead-code restarts draw random encoder outputs: pass generator=torch.Generator()")
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B·h·w, D)
        indices = self.nearest(flat.detach())  # (B·h·w,)
        q = self.embedding(indices).view(b, h, w, d).permute(0, 3, 1, 2)  # (B,D,h,w)
        loss = self.beta * F.mse_loss(z, q.detach())
        if not self.use_ema:
            loss = loss + F.mse_loss(q, z.detach())
        if self.training:
            self._update(flat.detach(), indices, generator)
        quantized = z + (q - z).detach()
        return quantized, loss, indices.view(b, h, w)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None) -> None:
        counts = torch.bincount(indices, minlength=self.num_codes).float()  # (K,)
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        self.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1.0 - self.ema_decay)
        if self.use_ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat.to(self.embed_sum.dtype))  # (K,D)
            self.embed_sum.mul_(self.ema_decay).add_(sums, alpha=1.0 - self.ema_decay)
            live = self.cluster_size > self.eps  # codes whose statistics still carry information
            means = self.embed_sum / self.cluster_size.clamp_min(self.eps).unsqueeze(1)  # (K,D)
            weight = self.embedding.weight
            weight.copy_(torch.where(live.unsqueeze(1), means.to(weight.dtype), weight))
        if self.restart_after > 0:
            self._restart_dead_codes(flat, generator)

    def _restart_dead_codes(self, flat: torch.Tensor, generator: torch.Generator) -> None:
        dead = (self.steps_unused >= self.restart_after).nonzero().squeeze(1)  # (n_dead,)
        if dead.numel() == 0:
            return
        pick = torch.randint(flat.shape[0], (dead.numel(),), generator=generator, device=generator.device)
        new = flat[pick.to(flat.device)]  # (n_dead,D)
        self.embedding.weight[dead] = new.to(self.embedding.weight.dtype)
        self.embed_sum[dead] = new.to(self.embed_sum.dtype)
        self.cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0

    def usage(self) -> dict[str, float]:
        """Running codebook usage: ``perplexity`` of the EMA assignment counts (1 = one code, K = uniform) and
        ``stale_codes``, the number of codes not assigned in the last training step (just-restarted codes count
        as fresh). For an exact per-batch figure use ``codebook_perplexity(indices, K)``."""
        p = self.cluster_size.float() / self.cluster_size.float().sum().clamp_min(self.eps)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        stale = int((self.steps_unused > 0).sum())
        return {"perplexity": float(perplexity), "stale_codes": stale, "num_codes": self.num_codes}


class MoVQ(nn.Module):
    """Kandinsky 3 MoVQ: ``encode`` (B,3,H,W) in [-1,1] -> (B,z,H/f,W/f) raw latents; ``decode`` the reverse.

    f = ``config.downsample_factor`` (8 for the released model). No scaling factor anywhere (architecture §3.3).
    """

    def __init__(self, config: MoVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, kernel_size=1)
        if config.codebook_size > 0:
            self.quantize = VectorQuantizer(
                config.codebook_size,
                config.z_channels,
                beta=config.codebook_beta,
                use_ema=config.codebook_ema,
                ema_decay=config.codebook_ema_decay,
                restart_after=config.codebook_restart_after,
            )
        else:
            self.quantize = None
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, kernel_size=1)
        self.decoder = Decoder(config)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, images: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """(B,in_channels,H,W) images in [-1,1] -> (B,z,H/f,W/f) latents = quant_conv(encoder(x)), unquantised.

        ``chunk_size`` runs the batch in pieces of at most that many images to bound memory.
        """
        f, c = self.downsample_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"MoVQ.encode expects (B,{c},H,W) images in [-1,1], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"MoVQ.encode: image size {h}x{w} is not divisible by the downsampling factor {f}; "
                f"resize or crop to multiples of {f}"
            )
        return _chunked(lambda x: self.quant_conv(self.encoder(x)), images, chunk_size)

    def decode(self, latents: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
        """(B,z,h,w) latents -> (B,out_ch,h·f,w·f) images in about [-1,1]; the raw z conditions the SpatialNorms.

        ``chunk_size`` runs the batch in pieces of at most that many latents (the original decodes in 2 chunks).
        """
        z = self.config.z_channels
        if latents.ndim != 4 or latents.shape[1] != z:
            raise ValueError(f"MoVQ.decode expects (B,{z},h,w) latents, got shape {tuple(latents.shape)}")
        return _chunked(lambda x: self.decoder(self.post_quant_conv(x), x), latents, chunk_size)

    def quantize_latents(
        self, latents: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,z,h,w) -> (quantized latents, scalar codebook+commitment loss, (B,h,w) indices); needs a codebook."""
        if self.quantize is None:
            raise ValueError("this MoVQ has no codebook; build it with MoVQConfig(codebook_size > 0)")
        return self.quantize(latents, generator=generator)

    def forward(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None, quantize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
        """Training pass: images -> (reconstruction (B,out_ch,H,W), quantiser loss (scalar), info).

        Without a codebook, or with ``quantize=False`` (the pipelines' path: ``decode(encode(x))``), the latents
        pass through and the loss is 0. ``info`` holds ``latents`` (pre-quantiser), ``indices`` (B,h,w) and the
        batch ``perplexity`` (both None when nothing is quantised).
        """
        latents = self.encode(images)
        if self.quantize is None or not quantize:
            loss = latents.new_zeros(())
            quantized, indices, perplexity = latents, None, None
        else:
            quantized, loss, indices = self.quantize(latents, generator=generator)
            perplexity = codebook_perplexity(indices, self.config.codebook_size)
        info = {"latents": latents, "indices": indices, "perplexity": perplexity}
        return self.decode(quantized), loss, info


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    if chunk_size is None or x.shape[0] <= chunk_size:
        return fn(x)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return torch.cat([fn(part) for part in x.split(chunk_size)], dim=0)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
