"""Lazy tensor sources and the layout-neutral description of where each component's weights come from.

A :class:`TensorSource` is a read-only mapping ``key -> tensor`` that knows every tensor's shape and dtype
without reading it (:meth:`TensorSource.meta`) and reads one tensor per ``source[key]``. Loaders and the
converter consume sources one tensor at a time, so peak memory stays near one model in the target dtype (loading)
or one tensor (converting). Keys are always the *original* Kandinsky 3 names (docs/architecture.md §2.10, §3.4):
layouts with other names are wrapped in a :class:`RenamedSource`.

A :class:`Checkpoint` is one model's files in one layout, opened once: it hands out a :class:`ModelSource` per
network and a :class:`TextSource` for the text encoder, and says how the model is conditioned and what it renders
by default.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kandinsky3.components import SamplingDefaults
from kandinsky3.weights.safe_io import SAFETENSORS_DTYPES, CheckpointError, release_pages

__all__ = [
    "TensorSource",
    "DictSource",
    "SafetensorsSource",
    "RenamedSource",
    "MergedSource",
    "ModelSource",
    "TextSource",
    "Checkpoint",
]

_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header size


class TensorSource(Mapping[str, torch.Tensor]):
    """Read-only ``key -> tensor`` mapping with metadata access; ``path`` names the file for error messages."""

    path: Path | None = None

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of ``key`` without reading its data."""
        raise NotImplementedError

    def release(self, key: str) -> None:
        """Forget any memory held for ``key`` after it has been used (a hint; default: nothing to do)."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.meta(key)[0] for key in self}

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype shared by every floating tensor, float32 if they differ, None if there are none."""
        dtypes = {self.meta(key)[1] for key in self if self.meta(key)[1].is_floating_point}
        if not dtypes:
            return None
        return dtypes.pop() if len(dtypes) == 1 else torch.float32


class DictSource(TensorSource):
    """Tensors already unpickled (possibly memory-mapped by ``torch.load(mmap=True)``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: Path | None, mmapped: bool = False):
        self._tensors = dict(tensors)
        self.path = path
        self.mmapped = mmapped

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        tensor = self._tensors[key]
        return tuple(tensor.shape), tensor.dtype

    def release(self, key: str) -> None:
        if self.mmapped:
            release_pages(self._tensors[key])


class SafetensorsSource(TensorSource):
    """A ``.safetensors`` file, read one tensor at a time with positioned reads.

    The file is first opened with ``safetensors.safe_open``, which validates it. Tensors are then read with plain
    ``readinto`` calls into fresh buffers rather than through a memory map, so nothing of the file stays resident
    after a tensor is released (a mapping keeps every touched page in the resident set until it is closed).
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError for every defect
            raise CheckpointError(self.path, f"is not a valid safetensors file, or is truncated ({error})") from None
        self._entries, self._data_start = self._read_header()

    def _read_header(self) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype, int, int]], int]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if not 0 < length <= min(_MAX_HEADER, size - 8):
                raise CheckpointError(self.path, f"has an invalid safetensors header length {length}")
            header = json.loads(file.read(length))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(self.path, f"tensor {name} has unsupported dtype {info['dtype']}")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if end - start != math.prod(shape) * dtype.itemsize or 8 + length + end > size:
                raise CheckpointError(self.path, f"tensor {name} lies outside the file (truncated?)")
            entries[name] = (shape, dtype, start, end)
        return entries, 8 + length

    def __getitem__(self, key: str) -> torch.Tensor:
        shape, dtype, start, end = self._entries[key]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - start)
        with open(self.path, "rb") as file:
            file.seek(self._data_start + start)
            if file.readinto(buffer) != len(buffer):
                raise CheckpointError(self.path, f"tensor {key} is cut short; the file is truncated")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype, _, _ = self._entries[key]
        return shape, dtype


class RenamedSource(TensorSource):
    """A view of ``base`` under new names: ``names[new] = old``; ``shapes[new]`` reshapes (same numel).

    Used for diffusers checkpoints (docs/architecture.md §2.11, §3.5): renames, plus the MoVQ attention weights
    (C,C) <-> (C,C,1,1).
    """

    def __init__(
        self, base: TensorSource, names: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]] | None = None
    ):
        self.base = base
        self.path = base.path
        self._names = dict(names)
        self._shapes = dict(shapes or {})

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self.base[self._names[key]]
        return tensor.reshape(self._shapes[key]) if key in self._shapes else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype = self.base.meta(self._names[key])
        return self._shapes.get(key, shape), dtype

    def release(self, key: str) -> None:
        self.base.release(self._names[key])


class MergedSource(TensorSource):
    """Several sources (shards) seen as one; a key present in two shards is an error."""

    def __init__(self, sources: list[TensorSource], path: Path | None):
        self.path = path
        self._owner: dict[str, TensorSource] = {}
        for source in sources:
            for key in source:
                if key in self._owner:
                    where = f"{self._owner[key].path} and {source.path}"
                    raise CheckpointError(path, f"tensor {key} appears in both {where}")
                self._owner[key] = source

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._owner[key].meta(key)

    def release(self, key: str) -> None:
        self._owner[key].release(key)


@dataclass
class ModelSource:
    """One network's weights: lazy tensors under original key names plus its config (None: infer from shapes)."""

    tensors: TensorSource
    config: Any = None


@dataclass
class TextSource:
    """Everything the text encoder needs.

    ``t5_folder`` holds a transformers T5 ``config.json``, weights (``t5_variant`` names e.g. diffusers' ``fp16``
    files) and, unless ``tokenizer_folder`` says otherwise, the tokenizer. ``conditioning`` maps
    ``projection.0.weight``, ``projection.1.weight``, ``projection.1.bias`` and optionally ``null_embedding`` to
    tensors; ``conditioning_files`` lists where they were read (for messages).
    """

    t5_folder: Path
    tokenizer_folder: Path
    conditioning: dict[str, torch.Tensor]
    t5_variant: str | None = None
    conditioning_files: list[Path] = field(default_factory=list)

    @property
    def style(self) -> str:
        """"original" when a null embedding is present (docs/architecture.md §4.5), else "diffusers"."""
        return "original" if "null_embedding" in self.conditioning else "diffusers"


class Checkpoint:
    """One model's files in one layout, opened by :func:`kandinsky3.weights.open_checkpoint`; nothing is read
    before a ``*_source`` call. Subclasses: ``OriginalCheckpoint``, ``DiffusersCheckpoint``, ``NativeCheckpoint``.

    ``root``: the local folder; ``layout``: "original", "diffusers" or "native"; ``variant``: "base", "flash" or
    "inpainting";
    ``conditioning``: "original" (null-embedding unconditional context) or "diffusers" (none);
    ``generation``: "3.0" / "3.1" for original checkpoints, else None; ``scheduler_config``: the diffusers
    scheduler config when the checkpoint has one; ``sampling_defaults``: the size (and, where recorded, guidance,
    steps, sampler) the model renders with by default.
    """

    root: Path
    layout: str
    variant: str
    conditioning: str
    generation: str | None = None
    scheduler_config: dict[str, Any] | None = None
    sampling_defaults: SamplingDefaults = SamplingDefaults()  # the released models: 1024×1024

    def unet_source(self) -> ModelSource:
        raise NotImplementedError

    def movq_source(self) -> ModelSource:
        raise NotImplementedError

    def text_source(self) -> TextSource:
        raise NotImplementedError
