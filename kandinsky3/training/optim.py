"""From a loss to updated weights: optimizers (AdamW, Lion), the learning rate as a pure function of the
step, mixed precision (autocast, loss scaling) and the clipped optimizer step.

References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101 (AdamW);
Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675 (Lion, Algorithm 2).
The Kandinsky 3 report trained the inpainting model with Lion at lr 1e-5 and 10k warm-up steps
(practice §8).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
from torch import nn

__all__ = ["Lion", "learning_rate", "scheduled_lr", "set_lr", "param_groups", "build_optimizer", "autocast",
           "make_grad_scaler", "optimizer_step"]


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


def learning_rate(step: int, base_lr: float, warmup_steps: int, *, decay: str = "constant", max_steps: int = 0,
                  min_ratio: float = 0.1) -> float:
    """lr of optimizer step ``step`` (0-based): linear warm-up (step+1)/warmup·base_lr, then constant, or with
    ``decay="cosine"`` a half cosine from base_lr down to min_ratio·base_lr at ``max_steps``.

    A pure function of the step, so a resumed run sets the same lr (nanoGPT ``get_lr``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant" or max_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def scheduled_lr(step: int, base_lr: float, schedule) -> float:
    """:func:`learning_rate` of a run's ``schedule`` section (warm-up, decay, length)."""
    return learning_rate(step, base_lr, schedule.warmup_steps, decay=schedule.lr_decay,
                         max_steps=schedule.max_steps, min_ratio=schedule.min_lr_ratio)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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
    """"adamw" (torch's fused kernel: one pass over all parameters, ~3.5x faster than foreach for the small model's
    750 tensors on a CPU) or "lion" over the trainable parameters, grouped by :func:`param_groups`."""
    groups = param_groups(named_parameters, weight_decay)
    if name == "adamw":
        sharded = any(hasattr(p, "full_tensor") for group in groups for p in group["params"])  # FSDP2 DTensors
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"foreach": True} if sharded else {"fused": True}))
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer must be 'adamw' or 'lion', got {name!r}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for "bf16" / "fp16" (fp16 needs CUDA); a no-op context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler that is active only for fp16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, parameters: Iterable[nn.Parameter],
                   grad_clip: float) -> torch.Tensor | None:
    """Unscale, clip the global gradient norm to ``grad_clip`` (0 = no clipping), step, update the scaler and
    clear the gradients. Returns the norm before clipping (a full tensor under FSDP), or None without clipping."""
    scaler.unscale_(optimizer)
    grad_norm = None
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
