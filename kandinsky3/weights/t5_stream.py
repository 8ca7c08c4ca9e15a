"""A T5 encoder that runs block by block from its files: the 8.6B Flan-UL2 encoder in ~1 GB of memory.

The released text encoder is 17 GB in bf16 — more than the U-Net and the MoVQ together, and more than a 16 GB GPU or
a 24 GB machine can hold beside them (SPEC §9). Its blocks run strictly one after another, so only one needs to be
in memory at a time. :func:`load_streamed_t5` builds the real ``transformers.T5EncoderModel`` on the meta device,
materialises only the final norm and installs hooks on the token embedding and on each of the 32 blocks:

- before a unit runs, its weights are read from the checkpoint (safetensors positioned reads, or a memory-mapped
  ``.bin`` shard whose pages are released afterwards) and cast to the target dtype and device;
- after it ran, they go back to the meta device, which frees them;
- while unit i computes, a background thread reads unit i+1 in its stored dtype (``prefetch=True``), so disk and
  compute overlap.

The forward pass is transformers' own, so the outputs equal those of the fully loaded model exactly. The price is
reading the encoder's weights once per call (the OS page cache usually keeps them): encoding is slower, which
matters little since a prompt is encoded once per image while the U-Net runs 25-50 times.
"""

from __future__ import annotations

import os
import types
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from kandinsky3.weights.safe_io import CheckpointError, check_shapes
from kandinsky3.weights.sources import TensorSource
from kandinsky3.weights.t5 import _source_names, _tied_keys, load_t5_config, t5_target_dtypes, t5_weight_source

__all__ = ["load_streamed_t5", "is_streamed", "t5_weight_bytes", "should_stream"]

_BLOCK_PREFIX = "encoder.block."


class _Streamer:
    """Forward hooks on the streamed units of a T5 encoder: load a unit's weights just before it runs, drop them
    right after, and (``prefetch``) read the next unit's stored tensors in a background thread meanwhile.

    Units, in execution order: the token embedding, then the blocks. Weights are cast to the device and dtype of
    the resident final norm at the time a unit runs, so ``.to(device)`` / ``.to(dtype)`` of the model moves and
    casts everything; idle (meta) units ignore such calls. A prefetched unit waits in its stored dtype (half the
    size of fp32 for the released fp16/bf16 files).
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
        for index, (module, _) in enumerate(units):
            module.register_forward_pre_hook(self._loader(index))
            module.register_forward_hook(_unload)
            module._apply = types.MethodType(_idle_apply, module)

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
            module.load_state_dict(tensors, strict=True, assign=True)

        return load


def _unload(module: nn.Module, args, output) -> None:
    nn.Module._apply(module, lambda tensor: tensor.to("meta"))  # frees the weights; the next call reads them again


def _idle_apply(module: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """``Module._apply`` of a streamed unit: ``.to()``, ``.half()`` … leave the (meta) unit alone."""
    return module


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
    for inference only (no gradients reach the streamed weights).
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
    model.load_state_dict({key: place(key, read_stored(key), device, targets[key]) for key in resident},
                          strict=False, assign=True)
    model.shared._apply = types.MethodType(_idle_apply, model.shared)  # unused by the encoder; stays on meta
    streamer = _Streamer(model, units, read_stored, place, target_dtypes, prefetch)
    model.requires_grad_(False)
    model._kandinsky3_streamer = streamer
    model.streams_weights = True  # kandinsky3.models.storage.compute_in casts it instead of parametrizing it
    model._kandinsky3_source = source
    return model.eval()


def is_streamed(t5: nn.Module) -> bool:
    """Whether a T5 module came from :func:`load_streamed_t5` (its blocks are not held in memory)."""
    return hasattr(t5, "_kandinsky3_streamer")


def t5_weight_bytes(folder: str | Path, variant: str | None, dtype: torch.dtype | None) -> int:
    """Bytes the T5 weights of ``folder`` take in ``dtype`` (None: as stored), from the file headers alone."""
    source: TensorSource = t5_weight_source(Path(folder), variant)
    total = 0
    for key in source:
        shape, stored = source.meta(key)
        size = torch.Size(shape).numel()
        total += size * (dtype.itemsize if dtype is not None and stored.is_floating_point else stored.itemsize)
    return total


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_stream(folder: str | Path, variant: str | None, dtype: torch.dtype | None, device) -> bool:
    """The ``"auto"`` rule: stream when the T5 weights would take more than a third of the free memory of their
    device (the U-Net, MoVQ and activations need the rest). Unknown sizes never stream."""
    try:
        size = t5_weight_bytes(folder, variant, dtype)
    except CheckpointError:
        return False
    return size > _available_bytes(torch.device(device)) // 3
