"""Optimizers (AdamW, Lion) and the learning-rate schedule as a pure function of the step.

References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101 (AdamW);
Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675 (Lion, Algorithm 2).
The Kandinsky 3 report trained the inpainting model with Lion at lr 1e-5 and 10k warm-up steps
(SPEC §8).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["Lion", "learning_rate", "param_groups", "build_optimizer"]


class Lion(torch.optim.Optimizer):
    """Lion: p ← p − lr·(sign(β1·m + (1−β1)·g) + λ·p); then m ← β2·m + (1−β2)·g.

    Notation (paper Algorithm 2): g gradient, m the single momentum buffer ``exp_avg``, λ the
    decoupled weight decay. Update magnitudes are exactly lr per element, so Lion wants a 3-10×
    smaller lr than AdamW (and a correspondingly larger λ).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0 or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(f"Lion needs lr > 0, betas in [0, 1), weight_decay >= 0; "
                             f"got {lr}, {betas}, {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            moments = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moments.append(state["exp_avg"])
            beta1, beta2 = group["betas"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            update = torch._foreach_lerp(grads, moments, beta1)  # β1·m + (1−β1)·g
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-group["lr"])
            torch._foreach_lerp_(moments, grads, 1.0 - beta2)  # m ← β2·m + (1−β2)·g
        return loss


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """lr of optimizer step ``step`` (0-based): linear warm-up (step+1)/warmup·base_lr, then constant.

    A pure function of the step, so a resumed run sets the same lr (nanoGPT ``get_lr``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only (ndim >= 2); none on norms, biases, embeddings vectors."""
    decay, no_decay = [], []
    for _, parameter in named_parameters:
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    name: str, named_parameters: Iterable[tuple[str, nn.Parameter]], lr: float,
    betas: tuple[float, float], weight_decay: float,
) -> torch.optim.Optimizer:
    """"adamw" (torch, foreach) or "lion" over the trainable parameters, grouped by :func:`param_groups`."""
    groups = param_groups(named_parameters, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer must be 'adamw' or 'lion', got {name!r}")
