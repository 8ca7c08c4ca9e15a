"""A T5 encoder that runs block by block from its files: the 8.6B Flan-UL2 encoder in ~1 GB of memory.

The released text encoder is 17 GB in bf16 (docs/architecture.md §4.7) — more than the U-Net and the MoVQ together,
and more than a 16 GB GPU or a 24 GB machine can hold beside them. Its blocks run strictly one after another, so
only one needs to be in memory at a time. :func:`load_streamed_t5` builds the real ``transformers.T5EncoderModel``,
keeps only the final norm resident and leaves every other parameter slot empty (``None``: the module holds no
tensor there, so ``.to()``, ``.half()`` … pass over it). Forward hooks on the token embedding and on each of the
blocks (the *units*) then do the rest:

- before a unit runs, its weights are read from the checkpoint (safetensors positioned reads, or a memory-mapped
  ``.bin`` shard whose pages are released afterwards), cast to the target dtype and device and registered as its
  parameters;
- after it ran (or failed), its parameter slots are emptied again, which frees the weights;
- while unit i computes, a background thread reads unit i+1 in its stored dtype (``prefetch=True``), so disk and
  compute overlap.

The forward pass is transformers' own, so the outputs equal those of the fully loaded model exactly. The price is
reading the encoder's weights once per call (the OS page cache usually keeps them): encoding is slower, which
matters little since a prompt is encoded once per image while the U-Net runs 25-50 times.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from kandinsky3.lowmem.memory import available_bytes
from kandinsky3.lowmem.placement import t5_needs_streaming
from kandinsky3.lowmem.storage import mark_streamed
from kandinsky3.weights.safe_io import CheckpointError, check_shapes
from kandinsky3.weights.sources import TensorSource
from kandinsky3.weights.t5 import (
    _IGNORED_PREFIXES,
    _source_names,
    _tied_keys,
    load_t5_config,
    t5_target_dtypes,
    t5_weight_source,
)

__all__ = ["load_streamed_t5", "t5_weight_bytes", "t5_parameter_count", "should_stream"]

_BLOCK_PREFIX = "encoder.block."


def _fill(module: nn.Module, tensors: dict[str, torch.Tensor | None]) -> None:
    """Register each tensor as the parameter of that (dotted) name inside ``module``; None empties the slot."""
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        parameter = None if tensor is None else nn.Parameter(tensor, requires_grad=False)
        module.get_submodule(owner).register_parameter(leaf, parameter)


class _Streamer:
    """Forward hooks on the streamed units of a T5 encoder: load a unit's weights just before it runs, drop them
    right after, and (``prefetch``) read the next unit's stored tensors in a background thread meanwhile.

    Units, in execution order: the token embedding, then the blocks. Weights are cast to the device and dtype of
    the resident final norm at the time a unit runs, so ``.to(device)`` / ``.to(dtype)`` of the model moves and
    casts everything. A prefetched unit waits in its stored dtype (half the size of fp32 for the released fp16/bf16
    files).
    """

    def __init__(self, model: nn.Module, units: list[tuple[nn.Module, dict[str, str]]], read_stored, place,
                 target_dtypes, prefetch: bool):
        self.model = model
        self.units = units  # (module, {parameter name inside the module: checkpoint key})
        self.read_stored = read_stored  # checkpoint key -> stored tensor (CPU; may be a view of a mapped shard)
        self.place = place  # (key, stored, device, dtype) -> tensor in its own memory, the file's pages released
        self.target_dtypes = target_dtypes  # (keys, compute dtype) -> {key: dtype}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="t5-prefetch") if prefetch else None
        self.pending: dict[int, Future] = {}
        for index, (module, names) in enumerate(units):
            module.register_forward_pre_hook(self._loader(index))
            module.register_forward_hook(_unloader(names), always_call=True)

    def _read_unit(self, index: int) -> dict[str, torch.Tensor]:
        return {key: self.read_stored(key) for key in self.units[index][1].values()}

    def _loader(self, index: int):
        def load(module: nn.Module, args) -> None:
            weight = self.model.encoder.final_layer_norm.weight
            device, dtype = weight.device, weight.dtype
            if index == 0:
                self.pending.clear()  # a previous call that failed midway may have left a read behind
            future = self.pending.pop(index, None)
            stored = future.result() if future is not None else self._read_unit(index)
            if self.pool is not None and index + 1 < len(self.units):
                self.pending[index + 1] = self.pool.submit(self._read_unit, index + 1)
            names = self.units[index][1]
            targets = self.target_dtypes(list(names.values()), dtype)
            tensors = {}
            for name, key in names.items():  # cast one tensor at a time, dropping each stored copy
                tensors[name] = self.place(key, stored.pop(key), device, targets[key])
            _fill(module, tensors)

        return load


def _unloader(names: dict[str, str]):
    def unload(module: nn.Module, args, output) -> None:
        _fill(module, dict.fromkeys(names))  # frees the weights; the next call reads them again

    return unload


def load_streamed_t5(
    folder: str | Path,
    *,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prefetch: bool = True,
):
    """A ``T5EncoderModel`` whose embedding and blocks stay on disk until they run (see the module docstring).

    ``dtype`` None keeps the stored dtype; fp16 keeps the feed-forward ``wo`` in fp32, as transformers does. Units
    are materialised on the device and in the dtype of the resident final norm, so ``.to()`` works as usual. It is
    for inference only (no gradients reach the streamed weights); ``model.parameters()`` lists the resident final
    norm and whichever unit is running.
    """
    from transformers import T5EncoderModel

    folder = Path(folder)
    config = load_t5_config(folder)
    source = t5_weight_source(folder, variant)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for tied in _tied_keys():
        expected.pop(tied, None)
    names = _source_names(source, expected)
    check_shapes({key: source.meta(names[key])[0] for key in names}, expected, source.path, "T5 encoder")
    stored_dtypes = {key: source.meta(names[key])[1] for key in expected}

    def read_stored(key: str) -> torch.Tensor:
        return source[names[key]]

    def place(key: str, stored: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        tensor = stored.to(device=device, dtype=dtype)
        if tensor.data_ptr() == stored.data_ptr():
            tensor = tensor.clone()  # nothing was converted: never keep a view of a memory-mapped shard
        source.release(names[key])
        return tensor

    def target_dtypes(keys: list[str], compute: torch.dtype) -> dict[str, torch.dtype]:
        return t5_target_dtypes(keys, stored_dtypes, compute)

    units = [(model.encoder.embed_tokens, {"weight": "shared.weight"})]
    for index, block in enumerate(model.encoder.block):
        prefix = f"{_BLOCK_PREFIX}{index}."
        units.append((block, {key[len(prefix):]: key for key in expected if key.startswith(prefix)}))
    streamed = {key for _, keys in units for key in keys.values()}
    resident = [key for key in expected if key not in streamed]  # the final norm
    targets = t5_target_dtypes(resident, stored_dtypes, dtype)
    _fill(model, {key: place(key, read_stored(key), device, targets[key]) for key in resident})
    for module in model.modules():  # every other slot (units, and the tied `shared` the encoder never calls)
        empty = [name for name, parameter in module.named_parameters(recurse=False) if parameter.is_meta]
        _fill(module, dict.fromkeys(empty))
    mark_streamed(model, _Streamer(model, units, read_stored, place, target_dtypes, prefetch))
    return model.eval()


def _encoder_tensors(folder: str | Path, variant: str | None) -> Iterator[tuple[int, torch.dtype]]:
    """(elements, stored dtype) of each T5 encoder tensor of ``folder``, from the file headers alone (a full T5's
    decoder, and an embedding stored under both of its tied names, are not counted)."""
    source: TensorSource = t5_weight_source(Path(folder), variant)
    keys = [key for key in source if not key.startswith(_IGNORED_PREFIXES)]
    tied = {alias for alias in _tied_keys() if alias in keys and "shared.weight" in keys}
    for key in keys:
        if key not in tied:
            shape, stored = source.meta(key)
            yield math.prod(shape), stored


def t5_weight_bytes(folder: str | Path, variant: str | None, dtype: torch.dtype | None) -> int:
    """Bytes the T5 encoder weights of ``folder`` take in ``dtype`` (None: as stored), from the file headers."""
    return sum(size * (dtype.itemsize if dtype is not None and stored.is_floating_point else stored.itemsize)
               for size, stored in _encoder_tensors(folder, variant))


def t5_parameter_count(folder: str | Path, variant: str | None) -> int:
    """Parameters of the T5 encoder of ``folder``, from the file headers."""
    return sum(size for size, _ in _encoder_tensors(folder, variant))


def should_stream(folder: str | Path, variant: str | None, dtype: torch.dtype | None, device) -> bool:
    """The loaders' ``stream_t5="auto"`` rule (:func:`kandinsky3.lowmem.placement.t5_needs_streaming`) for the T5
    weights of ``folder`` in ``dtype`` on ``device``. Unknown sizes never stream."""
    try:
        size = t5_weight_bytes(folder, variant, dtype)
    except CheckpointError:
        return False
    return t5_needs_streaming(size, available_bytes(device))
