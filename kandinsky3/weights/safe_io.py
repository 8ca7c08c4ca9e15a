"""Safe, memory-frugal reading and writing of checkpoint files.

- ``.pt`` / ``.bin`` pickles are read only with ``torch.load(weights_only=True, mmap=True)`` (practice §7,
  "what a compatible loader must handle" 1): no arbitrary code runs, and tensor data stays in the file until touched.
  Legacy (pre-zip) pickles cannot be memory-mapped and are read whole. The result must be a tree of plain dicts
  with string keys and tensor leaves; anything else (a custom class, ``collections.Counter`` …) is refused.
- ``.safetensors`` files are validated with ``safetensors.safe_open`` and then read tensor by tensor with plain
  positioned reads (see :class:`kandinsky3.weights.sources.SafetensorsSource`).
- :func:`write_safetensors` streams tensors into a ``.safetensors`` file one at a time, so a converter never holds
  more than one tensor in memory (``safetensors.torch.save_file`` needs them all at once).

Every problem with a file raises :class:`CheckpointError`, whose message starts with the file's path.

Memory note: pages of a memory-mapped file count towards the process's resident set once touched, even though
they are clean and reclaimable. A streaming converter therefore calls :func:`release_pages` after each tensor
(``madvise(MADV_DONTNEED)``; for a clean file-backed mapping the kernel simply re-reads the file on the next
access, so this never changes data).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import pickle
import struct
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "CheckpointError",
    "load_torch_file",
    "check_shapes",
    "write_safetensors",
    "release_pages",
    "SAFETENSORS_DTYPES",
    "first_line",
    "preview",
]

# safetensors dtype codes (https://github.com/huggingface/safetensors, format description).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_LIST_PREVIEW = 8  # how many keys an error message lists before "and N more"


class CheckpointError(ValueError):
    """A checkpoint file (or folder) is unreadable, unsafe, incomplete or does not match the model.

    ``str(error)`` starts with the offending path; ``error.path`` holds it.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else Path(path)
        super().__init__(problem if path is None else f"{path}: {problem}")


def preview(items: list[str], limit: int = _LIST_PREVIEW) -> str:
    """``[a, b, …] and N more`` for error messages."""
    shown = ", ".join(items[:limit])
    return f"[{shown}]" + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------- pickles


def load_torch_file(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """Read a ``torch.save`` file safely -> (nested dict of tensors, whether its tensors are memory-mapped).

    Raises FileNotFoundError for a missing file and CheckpointError for a truncated or corrupted file, for a
    pickle that needs more than tensors and dicts, and for a top level that is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    mmapped = True
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap can only be used" not in str(error):
                raise
            mmapped = False  # a legacy (non-zip) pickle: read it whole
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            path,
            "holds Python objects other than tensors and dicts, so it was not unpickled (torch.load "
            f"weights_only=True refused it: {first_line(error)}). Re-save it as a plain dict of tensors.",
        ) from None
    except Exception as error:  # zip/pickle decoding errors have many types
        raise CheckpointError(
            path, f"cannot be read; the file is truncated or corrupted ({type(error).__name__}: {first_line(error)})"
        ) from None
    if type(obj) not in (dict, OrderedDict):
        raise CheckpointError(path, f"expected a dict of tensors at the top level, got {type(obj).__name__}")
    _check_tree(obj, path, "")
    return obj, mmapped


def first_line(error: BaseException) -> str:
    """The first line of an exception message (library errors can be many lines long)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_tree(node: Mapping, path: Path, where: str) -> None:
    """Require plain dicts with str keys and tensor leaves (a Counter is a dict subclass, and is refused)."""
    for key, value in node.items():
        name = f"{where}{key}" if isinstance(key, str) else f"{where}{key!r}"
        if not isinstance(key, str):
            raise CheckpointError(path, f"entry {name} has a non-string key of type {type(key).__name__}")
        if type(value) in (dict, OrderedDict):
            _check_tree(value, path, name + ".")
        elif not isinstance(value, torch.Tensor):
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            raise CheckpointError(
                path, f"entry {name!r} is a {kind}, not a tensor; only (nested) dicts of tensors are accepted"
            )


# --------------------------------------------------------------------------------------------- checks


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], path: Path | None, what: str
) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys of ``what`` read from ``path``."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{key}: expected {tuple(expected[key])}, got {tuple(shapes[key])}"
        for key in sorted(set(expected) & set(shapes))
        if tuple(shapes[key]) != tuple(expected[key])
    ]
    if missing or unexpected or wrong:
        parts = [f"{what} does not match the model ({len(shapes)} tensors in the file, {len(expected)} expected)"]
        if missing:
            parts.append(f"{len(missing)} missing keys {preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {preview(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} wrong shapes {preview(wrong)}")
        raise CheckpointError(path, "; ".join(parts))


# --------------------------------------------------------------------------------------------- writing


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(
    path: str | os.PathLike,
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    fetch: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Stream tensors into a ``.safetensors`` file, one ``fetch(name)`` at a time, in ``layout`` order.

    Format: 8-byte little-endian header length, JSON header ``{name: {dtype, shape, data_offsets}}`` (plus
    ``__metadata__``) padded with spaces to a multiple of 8 bytes, then the raw tensor bytes back to back. The
    header is computed from ``layout`` (name -> (shape, dtype)) before any tensor is fetched, and each fetched
    tensor must match its entry. Written to ``path + ".partial"`` and renamed when complete.
    """
    if sys.byteorder != "little":
        raise RuntimeError("write_safetensors needs a little-endian machine")
    header: dict[str, Any] = {}
    offset = 0
    for name, (shape, dtype) in layout.items():
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(blob)))
        file.write(blob)
        for name, (shape, dtype) in layout.items():
            tensor = fetch(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}: fetched {tuple(tensor.shape)} {tensor.dtype}, layout says {tuple(shape)} {dtype}"
                )
            file.write(_tensor_bytes(tensor))
            del tensor
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------- page release


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _libc_madvise()


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor that ``torch.load(mmap=True)`` mapped from a file.

    Only for file-backed, never-written storages (the sources of a converter): the kernel re-reads such pages
    from the file on the next access. A no-op where ``madvise`` is unavailable.
    """
    if _MADVISE is None:
        return
    storage = tensor.untyped_storage()
    address, size = storage.data_ptr(), storage.nbytes()
    if size == 0 or address == 0:
        return
    start = address - address % mmap.PAGESIZE
    _MADVISE(start, address + size - start, mmap.MADV_DONTNEED)
