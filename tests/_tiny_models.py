"""Tiny random Kandinsky 3 components for fast CPU tests (no download).

The U-Net has 2 levels (factor 2) and the MoVQ 2 levels (factor 2), so image sides must be
multiples of 4; a 16×16 image has an 8×8 latent.
"""

import math

import torch
from _tiny_text import tiny_text_encoder

from kandinsky3.models.movq import MoVQ, MoVQConfig
from kandinsky3.models.unet import UNet, UNetConfig

CONTEXT_DIM = 24


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values for every parameter (also the zero-initialised ones), scaled by fan-in."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
    return module


@torch.no_grad()
def randomize_near_identity_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter from ``seed`` alone: fan-in scaled normal weights, norm scales
    1 ± 0.1, other 1-D parameters ±0.1 (nothing of the default, global-RNG initialisation survives)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if parameter.ndim >= 2:
            parameter.copy_(noise / math.sqrt(parameter[0].numel()))
        else:
            is_scale = "norm" in name and name.endswith("weight")
            parameter.copy_(0.1 * noise + (1.0 if is_scale else 0.0))
    return module


def tiny_unet_config(num_channels: int = 4) -> UNetConfig:
    return UNetConfig(
        model_channels=32, init_channels=16, num_channels=num_channels, out_channels=4, time_embed_dim=32,
        context_dim=CONTEXT_DIM, groups=4, head_dim=8, dim_mult=(1, 2), num_blocks=2,
    )


def tiny_movq_config() -> MoVQConfig:
    return MoVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), resolution=64, norm_groups=8)


def tiny_components(num_channels: int = 4, seed: int = 0):
    """(unet, movq, text_encoder), random, in eval mode."""
    unet = randomize_(UNet(tiny_unet_config(num_channels)), seed).eval()
    movq = randomize_(MoVQ(tiny_movq_config()), seed + 1).eval()
    text_encoder = tiny_text_encoder(context_dim=CONTEXT_DIM, seed=seed)
    return unet, movq, text_encoder
