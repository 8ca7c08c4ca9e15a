"""Exponential moving average of model weights (the weights a diffusion run exports).

ê ← d·ê + (1 − d)·θ after every optimizer step s (0-based), with the warm-up
d_s = min(decay, (1+s)/(s+power+2)) so that early averages are not dominated by the random
initialisation. Until d_s reaches ``decay`` (at s = (decay·(power+2) − 1)/(1 − decay): 17,990 steps
for 0.9995 at the default power 8), the average is a power-function one whatever ``decay`` says: the
weights after step k count about k**power, so the average sits at (power+1)/(power+2) of the run so far
(0.9 at power 8). Power 0 is the plain mean of every weight seen. The decay is a pure function of the
step, so a resumed run continues exactly. Only trained parameters are averaged; frozen parameters and
buffers (an EMA-updated MoVQ codebook and its statistics) are taken from the live model when the
averaged weights are exported.

Build the EMA from the unwrapped module (before DDP; FSDP2 keeps parameter names) and update it
from the same module, so names never carry wrapper prefixes.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import EMAConfig

__all__ = ["EMA", "WARMUP_POWER", "build_ema", "ema_decay_at"]

WARMUP_POWER = 8.0  # the default warm-up (1+s)/(10+s)


def ema_decay_at(step: int, decay: float, power: float = WARMUP_POWER) -> float:
    """Decay used after optimizer step ``step`` (0-based): min(decay, (1+step)/(step+power+2))."""
    return min(decay, (1.0 + step) / (step + power + 2.0))


def build_ema(module: nn.Module, config: EMAConfig) -> EMA | None:
    """The EMA a run's ``ema`` section asks for, or None when ``decay`` is 0."""
    return EMA(module, config.decay, config.power) if config.decay > 0 else None


class EMA:
    """EMA copies of the named floating-point tensors of ``module`` that it trains, plus its buffers.

    Only parameters with ``requires_grad`` are averaged (a frozen T5 is not copied). Works on
    DTensor (FSDP2) parameters too: every copy has its parameter's placement, and
    :meth:`full_state_dict` gathers the full tensors.
    """

    def __init__(self, module: nn.Module, decay: float, power: float = WARMUP_POWER):
        self.decay, self.power = decay, power
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [params[name].detach().clone() for name in self.names]

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Average the current weights of ``module`` (the same module the EMA was built from) in."""
        params = dict(module.named_parameters())
        current = [params[name].detach() for name in self.names]
        torch._foreach_lerp_(self.shadow, current, 1.0 - ema_decay_at(step, self.decay, self.power))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors under their parameter names (local shards under FSDP)."""
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise KeyError(f"EMA state: missing {missing[:8]}, unexpected {unexpected[:8]}")
        with torch.no_grad():
            for name, tensor in zip(self.names, self.shadow):
                tensor.copy_(_like(state[name], tensor))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors as full CPU tensors (DTensor shards gathered)."""
        return {name: _full(t).cpu() for name, t in zip(self.names, self.shadow)}

    @contextlib.contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        """Inside the block ``module`` holds the averaged weights and the EMA the live ones; swapped back
        after (exactly: values are copied, not recomputed). Works on DTensor shards (all ranks must enter)."""
        self._swap(module)
        try:
            yield
        finally:
            self._swap(module)

    @torch.no_grad()
    def _swap(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, shadow in zip(self.names, self.shadow):
            live = params[name]
            saved = live.detach().clone()
            live.copy_(shadow)
            shadow.copy_(saved)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (a plain, unsharded module with the same names)."""
        params = dict(module.named_parameters())
        for name, tensor in zip(self.names, self.shadow):
            params[name].copy_(_full(tensor))


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full tensor placed like ``target`` (sharded the same way when ``target`` is a DTensor)."""
    value = value.to(device=target.device, dtype=target.dtype)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, target.device_mesh, target.placements)
    return value


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

