"""Losses of the trainers and the small patch discriminator of the MoVQ run.

References:
- Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks" (pix2pix),
  arXiv 1611.07004: the N-layer PatchGAN discriminator.
- Esser et al., "Taming Transformers", arXiv 2012.09841, eq. 7: the adaptive GAN weight
  λ = ‖∇_L L_rec‖ / (‖∇_L L_GAN‖ + δ) at the decoder's last layer L.
- Lim & Ye, "Geometric GAN", arXiv 1705.02894: the hinge loss.
- Ho et al., "Denoising Diffusion Probabilistic Models", arXiv 2006.11239, eq. 14: the ε-MSE loss.

Images are (B,3,H,W) in [-1,1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_mean

__all__ = [
    "PatchDiscriminator",
    "hinge_d_loss",
    "hinge_g_loss",
    "adaptive_gan_weight",
    "edge_loss",
    "reconstruction_losses",
    "psnr",
]


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN: (B,3,H,W) images -> (B,1,h,w) real/fake logits, one per overlapping patch.

    ``layers`` stride-2 4×4 convs (width doubling, capped at 8×``channels``), one stride-1 4×4 conv,
    then a 4×4 conv to one logit. GroupNorm instead of pix2pix's BatchNorm keeps every sample
    independent of the others in its batch (so DDP needs no synchronised statistics). Weights
    start from N(0, 0.02) as in pix2pix, drawn from a generator seeded with ``seed``.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, groups: int = 8, seed: int = 0):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(groups, out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                    if module.bias is not None:
                        module.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss −E[D(x̂)]."""
    return -fake_logits.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        delta: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """Detached λ = ‖∇ rec_loss‖ / (‖∇ gan_loss‖ + δ) w.r.t. ``last_layer``, clamped to [0, max_weight].

    Both gradients are averaged over processes first, so λ is the value a single process would
    compute on the whole (micro-)batch.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    rec_grad, gan_grad = all_reduce_mean(rec_grad.float()), all_reduce_mean(gan_grad.float())
    weight = rec_grad.norm() / (gan_grad.norm() + delta)
    return weight.clamp(0.0, max_weight).detach()


def reconstruction_losses(reconstruction: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean |x̂ − x|, mean (x̂ − x)²) computed in fp32."""
    diff = reconstruction.float() - images.float()
    return diff.abs().mean(), diff.pow(2).mean()


def edge_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean |∇x̂ − ∇x| over the horizontal and vertical neighbour differences, in fp32: a blurred edge or a
    rounded corner spreads its gradient where the target's is one sharp step, which the pixel terms barely see."""
    diff = reconstruction.float() - images.float()
    horizontal = (diff[..., :, 1:] - diff[..., :, :-1]).abs().mean()
    vertical = (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean()
    return 0.5 * (horizontal + vertical)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1,1] from their MSE: 10·log10(2² / mse) (peak-to-peak range 2)."""
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-10))
