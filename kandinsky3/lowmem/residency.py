"""Where a pipeline's components live between the phases of a call (encode text → denoise → decode).

Three policies, chosen per component when a pipeline is built:

* resident (default): a component stays where it was built.
* offload ``{component: device}``: it waits on the CPU and visits its device only while its phase runs (the
  8.6B text encoder is never on the GPU beside the U-Net).
* reload ``{component: loader}``: it waits on the *meta* device, holding no memory at all: its phase starts by
  calling ``loader()`` (which reads the weights from the checkpoint files) and moving the loaded tensors into it
  (:func:`adopt`), and ends by dropping them again (:func:`release`). Peak memory is then that of the largest
  component alone, not of all three; the price is reading that component from disk on every call. The factories'
  ``offload="disk"`` builds this policy.

A pipeline holds one :class:`Residency` and runs each phase in ``with self.residency.phase("unet", self.unet)``.
It keeps the same module objects throughout (``pipe.unet.config`` etc. work in every state); only the tensors
behind their parameters come and go.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from kandinsky3.components import COMPONENTS
from kandinsky3.lowmem.memory import return_free_memory
from kandinsky3.lowmem.storage import is_streamed

__all__ = ["Loader", "Residency", "check_offload", "check_reload", "placed", "adopt", "release", "is_released"]

Loader = Callable[[], nn.Module]


def check_offload(offload: dict[str, Any] | None) -> dict[str, torch.device] | None:
    """Validate an offload map {"unet": device, "text_encoder": device, "movq": device}."""
    if offload is None:
        return None
    if set(offload) != set(COMPONENTS):
        raise ValueError(f"offload must map exactly {sorted(COMPONENTS)} to devices, got {sorted(offload)}")
    return {name: torch.device(device) for name, device in offload.items()}


def check_reload(reload: dict[str, Loader] | None, offload: dict[str, torch.device] | None) -> dict[str, Loader]:
    """Validate a reload map {component: loader} (any subset of the components; none also offloaded)."""
    reload = dict(reload or {})
    unknown = sorted(set(reload) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"reload names unknown components {unknown}; choose from {list(COMPONENTS)}")
    for name, loader in reload.items():
        if not callable(loader):
            raise TypeError(f"reload[{name!r}] must be a callable returning the loaded {name}, got {loader!r}")
    if offload is not None and reload:
        raise ValueError("pass either offload (components wait on the CPU) or reload (they wait on disk), not both")
    return reload


def is_released(module: nn.Module) -> bool:
    """True when ``module``'s parameters and buffers hold no data (they are on the meta device)."""
    return any(tensor.is_meta for tensor in _unique_tensors(module).values())


def release(module: nn.Module) -> None:
    """Drop every parameter and buffer of ``module`` to the meta device (shapes and dtypes are kept; the tensor
    objects are new, so nothing that held the old ones keeps their memory through the module). A streamed module
    (the block-streamed T5) holds no weights worth dropping and is left alone."""
    if is_streamed(module):
        return
    module.to_empty(device="meta")


def adopt(module: nn.Module, loaded: nn.Module) -> nn.Module:
    """Move the tensors of ``loaded`` (the same architecture, freshly read) into ``module``; returns ``module``.

    Every parameter and buffer moves, non-persistent buffers and parametrized originals included: each pair of
    tensors trades contents (``torch.utils.swap_tensors``), so ``module``'s tensor objects now hold the data and
    ``loaded`` is left with ``module``'s empty (meta) ones — a reference cycle inside ``loaded`` (e.g. its
    parametrizations) cannot keep the weights alive after :func:`release`. Raises a ValueError naming the first
    difference when the two do not have the same tensors (names, shapes, dtypes): a checkpoint changed on disk since
    the pipeline was built would otherwise be swapped in silently.
    """
    ours, theirs = _unique_tensors(module), _unique_tensors(loaded)
    if ours.keys() != theirs.keys():
        missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        raise ValueError(f"the reloaded component does not match the pipeline's: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}; rebuild the pipeline")
    for name, tensor in ours.items():
        other = theirs[name]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise ValueError(f"the reloaded component's {name} is {tuple(other.shape)} {other.dtype}, the "
                             f"pipeline's {tuple(tensor.shape)} {tensor.dtype}; rebuild the pipeline")
    for name, tensor in ours.items():
        torch.utils.swap_tensors(tensor, theirs[name])
    return module


@contextlib.contextmanager
def placed(
    module: nn.Module,
    name: str,
    offload: dict[str, torch.device] | None = None,
    reload: dict[str, Loader] | None = None,
) -> Iterator[nn.Module]:
    """The block in which component ``name`` runs: with a loader in ``reload`` its weights are read at the start
    (if it holds none) and dropped at the end; with ``offload`` it moves to its device for the block and back to
    the CPU after it (its device memory is freed); otherwise nothing happens."""
    loader = (reload or {}).get(name)
    if loader is not None:
        if is_released(module):
            adopt(module, loader())
        try:
            yield module
        finally:
            on_cuda = any(tensor.is_cuda for tensor in _unique_tensors(module).values())
            release(module)
            return_free_memory()  # glibc keeps the freed heap blocks otherwise: they would add to the next phase
            if on_cuda:
                torch.cuda.empty_cache()  # hand the blocks back for other processes too
        return
    if offload is None:
        yield module
        return
    device = torch.device(offload[name])
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Residency:
    """A pipeline's residency policy: ``offload`` {component: device} or ``reload`` {component: loader} (validated;
    see the module docstring). ``Residency()`` keeps every component where it was built.

        residency = Residency(reload={"unet": read_unet})
        with residency.phase("unet", pipe.unet) as unet: ...
    """

    offload: dict[str, torch.device] | None = None
    reload: dict[str, Loader] = field(default_factory=dict)

    def __post_init__(self) -> None:
        offload = check_offload(self.offload)
        object.__setattr__(self, "offload", offload)  # normalised once, at construction
        object.__setattr__(self, "reload", check_reload(self.reload, offload))

    def phase(self, name: str, module: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """:func:`placed` for component ``name`` (its module is ``module``) under this policy."""
        return placed(module, name, self.offload, self.reload)


def _unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by its first name (non-persistent buffers too, unlike ``state_dict``); a tensor
    shared by two submodules appears once."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}
