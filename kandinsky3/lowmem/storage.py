"""Weights stored in one dtype, arithmetic in another: half the memory without half-precision math.

A 3B U-Net takes 12 GB in fp32 and 6 GB in bf16. On GPUs and on CPUs with AMX/AVX-512-BF16, bf16 math is fast and
the model simply runs in bf16. On CPUs without those instructions (AVX2 only, e.g. AMD Zen 3 or older Intel),
PyTorch's bf16 and fp16 matmuls and convolutions are 50-100x slower than fp32, so there the best choice is to *store*
the weights in bf16 and *compute* in fp32: :func:`compute_in` makes every floating parameter of a model return an
fp32 copy when a layer reads it (``torch.nn.utils.parametrize``), so each layer's weight exists in fp32 only while
that layer runs. :mod:`kandinsky3.lowmem.placement` decides when to do so.

The result equals the fp32 model whose weights were rounded to the storage dtype, up to fp32 summation order
(measured ≤ 4e-8 on a random U-Net). Casting costs one pass over the weights per forward call (for the 3B U-Net
~1 s per step on 2 cores, against ~15 s of fp32 math).

    unet = load_unet(path, dtype="bf16")          # 6 GB resident
    compute_in(unet, torch.float32)               # layers compute in fp32
    compute_dtype(unet)                           # torch.float32: the dtype inputs must have

A module can also keep its weights in their files and read them as it runs (the block-streamed T5,
:mod:`kandinsky3.lowmem.t5_stream`): :func:`mark_streamed` records that, :func:`is_streamed` asks it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["compute_in", "compute_dtype", "storage_dtype", "is_streamed", "mark_streamed"]

_STREAM = "weight_stream"  # the attribute that marks a streamed module; it holds the object that reads the weights
_COMPUTE = "_compute_dtype"  # the attribute compute_in leaves behind


def mark_streamed(module: nn.Module, stream: object) -> None:
    """Record that ``module`` keeps its weights in their files; ``stream`` (kept alive with it) reads them."""
    setattr(module, _STREAM, stream)


def is_streamed(module: nn.Module) -> bool:
    """Whether ``module`` reads its weights from their files as it runs (it holds almost none in memory)."""
    return getattr(module, _STREAM, None) is not None


class _CastTo(nn.Module):
    """Parametrization: the stored tensor, cast to ``dtype`` on every read."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make ``model``'s layers compute in ``dtype`` while its parameters stay stored in their current dtype.

    Floating parameters already in ``dtype`` are left alone. A streamed submodule (:func:`is_streamed`) holds almost
    nothing resident, so it is simply cast to ``dtype`` and reads its weights in that dtype. Inference only: the
    parametrized model's state-dict keys change (``…parametrizations.weight.original``), so save weights before
    calling this, not after. Returns ``model``; ``compute_dtype(model)`` then reports ``dtype``.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"compute dtype must be a floating dtype, got {dtype}")
    chosen = getattr(model, _COMPUTE, None)
    if chosen is not None:
        raise ValueError(f"this model already computes in {chosen}; load it again to change that")
    model.requires_grad_(False)  # inference only (and torch's module tracker trips over parametrized leaves)
    _parametrize(model, dtype)
    setattr(model, _COMPUTE, dtype)
    return model


def _parametrize(module: nn.Module, dtype: torch.dtype) -> None:
    if is_streamed(module):
        module.to(dtype)
        return
    children = list(module.children())  # before registering adds a `parametrizations` child
    for name, parameter in list(module.named_parameters(recurse=False)):
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parametrize.register_parametrization(module, name, _CastTo(dtype), unsafe=True)
    for child in children:
        _parametrize(child, dtype)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s inputs should have: the :func:`compute_in` dtype, else that of its first parameter."""
    chosen = getattr(model, _COMPUTE, None)
    return chosen if chosen is not None else storage_dtype(model)


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s first parameter is stored in (what it costs in memory); parameters on the meta device
    (a released component, see :mod:`kandinsky3.lowmem.residency`) count only when there are no others."""
    first = None
    for parameter in model.parameters():
        if not parameter.is_meta:
            return parameter.dtype
        first = parameter if first is None else first
    if first is None:
        raise ValueError(f"{type(model).__name__} has no parameters")
    return first.dtype
