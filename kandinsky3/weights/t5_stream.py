"""A T5 encoder that runs block by block from its files: the 8.6B Flan-UL2 encoder in ~1 GB of memory.

The released text encoder is 17 GB in bf16 — more than the U-Net and the MoVQ together, and more than a 16 GB GPU or
a 24 GB machine can hold beside them (SPEC §9). Its blocks run strictly one after another, so only one needs to be
in memory at a time. :func:`load_streamed_t5` builds the real ``transformers.T5EncoderModel`` on the meta device,
materialises the small resident part (token embedding, final norm) and installs hooks on each of the 32 blocks:

- before a block runs, its weights are read from the checkpoint (safetensors positioned reads, or a memory-mapped
  ``.bin`` shard whose pages are released afterwards) straight into the target dtype and device;
- after it ran, they go back to the meta device, which frees them;
- while block i computes, a background thread reads block i+1 (``prefetch=True``), so disk and compute overlap.

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


class _BlockStreamer:
    """Forward hooks on every block of ``model.encoder``: load its weights just before it runs, drop them after.

    Blocks are read onto the device and in the dtype of the model's token embedding at the time they run, so
    ``.to(device)`` / ``.to(dtype)`` of the resident part moves and casts the whole model; the idle (meta) blocks
    ignore such calls.
    """

    def __init__(self, model: nn.Module, fetch_block, prefetch: bool):
        self.model = model
        self.fetch_block = fetch_block  # (index, device, dtype) -> {parameter name inside the block: tensor}
        self.count = len(model.encoder.block)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="t5-prefetch") if prefetch else None
        self.pending: dict[int, Future] = {}
        for index, block in enumerate(model.encoder.block):
            block.register_forward_pre_hook(self._loader(index))
            block.register_forward_hook(_unload)
            block._apply = types.MethodType(_idle_apply, block)

    @property
    def placement(self) -> tuple[torch.device, torch.dtype]:
        weight = self.model.shared.weight
        return weight.device, weight.dtype

    def _loader(self, index: int):
        def load(block: nn.Module, args) -> None:
            device, dtype = self.placement
            if index == 0:
                self.pending.clear()  # a previous call that failed midway may have left a read behind
            future = self.pending.pop(index, None)
            tensors = future.result() if future is not None else self.fetch_block(index, device, dtype)
            block.load_state_dict(tensors, strict=True, assign=True)
            del tensors
            if self.pool is not None and index + 1 < self.count:
                self.pending[index + 1] = self.pool.submit(self.fetch_block, index + 1, device, dtype)

        return load


def _unload(block: nn.Module, args, output) -> None:
    nn.Module._apply(block, lambda tensor: tensor.to("meta"))  # frees the weights; the next call reads them again


def _idle_apply(block: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """``Module._apply`` of a streamed block: ``.to()``, ``.half()`` … leave the (meta) block alone."""
    return block


def load_streamed_t5(
    folder: str | Path,
    *,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prefetch: bool = True,
):
    """A ``T5EncoderModel`` whose blocks stay on disk until they run (see the module docstring).

    ``dtype`` None keeps the stored dtype; fp16 keeps the feed-forward ``wo`` in fp32, as transformers does. Blocks
    are materialised on the device and in the dtype of the token embedding, so ``.to()`` works as usual. It is for
    inference only (no gradients reach the streamed weights).
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

    def read(key: str, target_device: torch.device, target_dtype: torch.dtype) -> torch.Tensor:
        stored = source[names[key]]
        tensor = stored.to(device=target_device, dtype=target_dtype)
        if tensor.data_ptr() == stored.data_ptr():
            tensor = tensor.clone()  # never keep a view of a memory-mapped shard alive
        source.release(names[key])
        return tensor

    device = torch.device(device)
    targets = t5_target_dtypes(list(expected), stored_dtypes, dtype)
    resident = {key: read(key, device, targets[key]) for key in expected if not key.startswith(_BLOCK_PREFIX)}
    model.load_state_dict(resident, strict=False, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # tied in T5EncoderModel
    block_keys = [[key for key in expected if key.startswith(f"{_BLOCK_PREFIX}{index}.")]
                  for index in range(len(model.encoder.block))]

    def fetch_block(index: int, target_device: torch.device, target_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        keys = block_keys[index]
        block_targets = t5_target_dtypes(keys, stored_dtypes, target_dtype)
        prefix = f"{_BLOCK_PREFIX}{index}."
        return {key[len(prefix):]: read(key, target_device, block_targets[key]) for key in keys}

    streamer = _BlockStreamer(model, fetch_block, prefetch)
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
