"""Which dtype each component is stored and computed in, and what waits where: the fastest set-up that fits.

What "fast" means was measured (torch 2.13, 2 threads, AMD EPYC with AVX2 and no native bf16): a bf16 3×3
convolution runs at 0.5 GFLOP/s against 96 in fp32, bf16 linear layers at 17-20 GFLOP/s against 40-112, SDPA as
fast in bf16 as in fp32, and one Flan-UL2 T5 block takes 0.34 s in bf16 against 0.20 s in fp32. CPUs with
AVX512-BF16 or AMX, and GPUs, compute half precision as fast as fp32 or faster. :func:`half_precision_is_fast`
tells the two kinds apart; :func:`plan_placement` turns that, the model's size and the free memory into a
:class:`Placement`:

1. storage dtype (``dtype`` None): on CUDA the GPU's half precision — bf16 from sm80 on, else fp16 with the MoVQ
   kept in fp32 (docs/practice.md §9.1: it misbehaves in fp16) and T5's ``wo`` kept in fp32 by the loader
   (§4.7); elsewhere fp32 when the whole model fits the budget in fp32, else bf16.
2. compute dtype (``compute_dtype`` None): the storage dtype where the device computes it fast, else fp32 (weights
   stay in half precision and each layer reads an fp32 copy, :func:`kandinsky3.lowmem.storage.compute_in`). A half
   request on a CPU without fast half math thus becomes half storage + fp32 math, and the summary says so.
3. offload (None): nothing when the whole model, in its storage dtypes, fits the budget of its devices; otherwise on
   a GPU the components wait in host memory (``True``) if they fit there, and else they wait on disk (``"disk"``,
   :mod:`kandinsky3.lowmem.residency`).
4. stream_t5 (None): with ``offload="disk"``, or when T5 would take more than a third of its device's free memory
   (:func:`t5_needs_streaming`; the U-Net, the MoVQ and the activations need the rest).

The budget is ``FIT_FRACTION`` (3/4) of the free memory: the rest is for activations, the fp32 copy of the running
layer and the rest of the system. A 3B U-Net + 8.6B T5 + 270M MoVQ on a 24 GiB CPU without fast bf16 thus gets bf16
storage, fp32 math, a streamed T5 and disk offload; the bundled tiny model stays in fp32, resident, unstreamed.

    sizes = component_sizes(open_checkpoint(folder))        # parameters per component, from the file headers
    placement = plan_placement("cpu", sizes)
    logger.info(placement.summary)
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from kandinsky3.components import COMPONENTS
from kandinsky3.lowmem.memory import available_bytes as measure_available

__all__ = ["FIT_FRACTION", "Placement", "half_precision_is_fast", "plan_placement", "component_sizes",
           "parameter_count", "t5_needs_streaming"]

FIT_FRACTION = 0.75  # of the free memory, for the weights; the rest for activations and the system
HALF_DTYPES = (torch.float16, torch.bfloat16)
GIB = 2**30
_CPU_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

DtypeArg = torch.dtype | Mapping[str, torch.dtype | None] | None
FastCheck = Callable[[torch.device, torch.dtype], bool]


def half_precision_is_fast(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes ``dtype`` (fp16 or bf16) at least as fast as fp32.

    CUDA: by compute capability — bf16 needs sm80 (Ampere) or newer, fp16 is always fast. CPU: by the instruction
    flags of ``/proc/cpuinfo`` — bf16 needs ``avx512_bf16`` or ``amx_bf16``, fp16 ``avx512_fp16`` or ``amx_fp16``
    (``torch.backends.cpu.get_cpu_capability()`` names only the vector width torch dispatches to, "AVX2" or
    "AVX512", which does not tell: an AVX512 Skylake has no bf16 instructions, a Zen 4 has them); where no x86 flags
    can be read (macOS, ARM) a 256² matrix product in ``dtype`` is timed against fp32 instead (a few ms, once per
    process). Other devices: True.
    """
    device = torch.device(device)
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return dtype == torch.float16 or major >= 8
    if device.type == "cpu":
        return _cpu_half_is_fast(dtype)
    return True


@functools.cache
def _cpu_half_is_fast(dtype: torch.dtype) -> bool:
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & _CPU_FLAGS[dtype])
    return _half_gemm_seconds(dtype) <= _half_gemm_seconds(torch.float32)


def _cpu_flags() -> set[str] | None:
    """The x86 instruction flags of the first CPU in ``/proc/cpuinfo``, or None where there are none to read."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def _half_gemm_seconds(dtype: torch.dtype, side: int = 256, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of one ``side``² matrix product in ``dtype`` (after a warm-up product)."""
    a = torch.ones(side, side, dtype=dtype)
    a @ a
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return best


def t5_needs_streaming(t5_bytes: int, free_bytes: int) -> bool:
    """Stream T5 block by block when its weights would take more than a third of the free memory of its device."""
    return t5_bytes > free_bytes // 3


@dataclass(frozen=True)
class Placement:
    """How the components run: per component ("unet", "movq", "text_encoder") the ``storage_dtype`` its weights
    take in memory and the ``compute_dtype`` its layers compute in (they differ when half-precision weights are read
    as fp32, :func:`kandinsky3.lowmem.storage.compute_in`); whether T5 streams from its files; ``offload`` (False:
    all resident; True: they wait on the CPU between phases; "disk": the U-Net and MoVQ wait in their files); and
    ``summary``, the one log line that says what was chosen and why."""

    storage_dtype: Mapping[str, torch.dtype]
    compute_dtype: Mapping[str, torch.dtype]
    stream_t5: bool
    offload: bool | str
    summary: str


def plan_placement(
    device: str | torch.device | Mapping[str, str | torch.device],
    sizes: Mapping[str, int],
    *,
    dtype: DtypeArg = None,
    compute_dtype: DtypeArg = None,
    stream_t5: bool | str | None = None,
    offload: bool | str | None = None,
    available_bytes: int | None = None,
    host_bytes: int | None = None,
    is_fast: FastCheck = half_precision_is_fast,
) -> Placement:
    """The :class:`Placement` for a model of ``sizes`` parameters per component (rules in the module docstring).

    ``device``, ``dtype`` and ``compute_dtype`` take one value or a {component: value} dict (a dict may leave
    components out); None means "decide". ``stream_t5`` None or "auto" and ``offload`` None decide too.
    ``available_bytes`` is the free memory of each device used and ``host_bytes`` that of the CPU, asked only when a
    model on a GPU does not fit there (None: measured); ``is_fast(device, half dtype)`` says whether a device
    computes that dtype fast. Given these the result depends on its arguments alone.
    """
    devices = _per_component(device, "device", torch.device, required=True)
    requested = _per_component(dtype, "dtype", _check_dtype)
    computing = _per_component(compute_dtype, "compute_dtype", _check_dtype)
    if set(sizes) != set(COMPONENTS):
        raise ValueError(f"sizes must give the parameters of exactly {list(COMPONENTS)}, got {sorted(sizes)}")
    if offload not in (None, False, True, "disk"):
        raise ValueError(f"offload must be True, False or 'disk', got {offload!r}")
    if stream_t5 not in (None, "auto", False, True):
        raise ValueError(f"stream_t5 must be True, False or 'auto', got {stream_t5!r}")
    free = {str(d): available_bytes if available_bytes is not None else measure_available(d)
            for d in set(devices.values())}
    storage = _storage_dtypes(devices, requested, sizes, free, is_fast)
    compute = {name: computing.get(name) or _compute_dtype(devices[name], storage[name], is_fast)
               for name in COMPONENTS}
    weight_bytes = {name: sizes[name] * storage[name].itemsize for name in COMPONENTS}
    if offload is None:
        offload = _offload(devices, weight_bytes, free, host_bytes)
    if stream_t5 in (None, "auto"):
        stream_t5 = offload == "disk" or t5_needs_streaming(weight_bytes["text_encoder"],
                                                             free[str(devices["text_encoder"])])
    summary = _summary(devices, storage, compute, requested, computing, stream_t5, offload,
                       sum(weight_bytes.values()), free)
    return Placement(MappingProxyType(storage), MappingProxyType(compute), bool(stream_t5), offload, summary)


def _check_dtype(value: Any) -> torch.dtype:
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"expected a floating torch dtype, got {value!r}")
    return value


def _per_component(value: Any, what: str, convert: Callable[[Any], Any], required: bool = False) -> dict[str, Any]:
    """{component: converted value} from one value or a dict (missing or None entries: left out)."""
    if not isinstance(value, Mapping):
        value = dict.fromkeys(COMPONENTS, value)
    unknown = sorted(set(value) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"{what} names unknown components {unknown}; choose from {list(COMPONENTS)}")
    chosen = {name: convert(value[name]) for name in COMPONENTS if value.get(name) is not None}
    if required and len(chosen) != len(COMPONENTS):
        raise ValueError(f"{what} must give every component {list(COMPONENTS)}, got {value!r}")
    return chosen


def _fits(devices: Mapping[str, torch.device], weight_bytes: Mapping[str, int], free: Mapping[str, int]) -> bool:
    """Whether each device's components take at most ``FIT_FRACTION`` of its free memory."""
    need: dict[str, int] = {}
    for name, device in devices.items():
        need[str(device)] = need.get(str(device), 0) + weight_bytes[name]
    return all(total <= FIT_FRACTION * free[device] for device, total in need.items())


def _storage_dtypes(devices, requested, sizes, free, is_fast: FastCheck) -> dict[str, torch.dtype]:
    """Rule 1: the requested dtypes, the GPU's half precision on CUDA, else fp32 when the model fits in it."""
    storage = dict(requested)
    for name in COMPONENTS:
        device = devices[name]
        if name not in storage and device.type == "cuda":
            half = torch.bfloat16 if is_fast(device, torch.bfloat16) else torch.float16
            storage[name] = torch.float32 if name == "movq" and half == torch.float16 else half
    undecided = [name for name in COMPONENTS if name not in storage]
    fp32_bytes = {name: sizes[name] * storage.get(name, torch.float32).itemsize for name in COMPONENTS}
    fallback = torch.float32 if _fits(devices, fp32_bytes, free) else torch.bfloat16
    return {**storage, **dict.fromkeys(undecided, fallback)}


def _compute_dtype(device: torch.device, storage: torch.dtype, is_fast: FastCheck) -> torch.dtype:
    """Rule 2: half precision is computed in fp32 where the device is slow at it."""
    if storage in HALF_DTYPES and not is_fast(device, storage):
        return torch.float32
    return storage


def _offload(devices, weight_bytes, free, host_bytes: int | None) -> bool | str:
    """Rule 3: resident when it fits; on a GPU the components wait in host memory if they fit there; else disk."""
    if _fits(devices, weight_bytes, free):
        return False
    if not any(device.type == "cuda" for device in devices.values()):
        return "disk"
    host = {"cpu": host_bytes if host_bytes is not None else free.get("cpu") or measure_available("cpu")}
    return True if _fits(dict.fromkeys(COMPONENTS, torch.device("cpu")), weight_bytes, host) else "disk"


def _summary(devices, storage, compute, requested, computing, stream_t5: bool, offload, total: int, free) -> str:
    """The one log line: dtypes per component, streaming, offload, the sizes behind them, and any half request
    that computes in fp32 because the device is slow at it (not because fp32 math was asked for)."""
    parts = []
    for name in COMPONENTS:
        dtypes = _name(storage[name]) if storage[name] == compute[name] else \
            f"{_name(storage[name])} ({_name(compute[name])} math)"
        streamed = ", streamed" if name == "text_encoder" and stream_t5 else ""
        parts.append(f"{name} {dtypes}{streamed}" + ("" if len(free) == 1 else f" on {devices[name]}"))
    memory = ", ".join(f"{device} {size / GIB:.1f} GiB" for device, size in free.items())
    line = f"{'; '.join(parts)}; offload={offload!r} (weights {total / GIB:.1f} GiB; free: {memory})"
    slow = [name for name in COMPONENTS if name in requested and name not in computing
            and storage[name] in HALF_DTYPES and compute[name] != storage[name]]
    if slow:
        half = _name(storage[slow[0]])
        line += (f"; {half} requested for {', '.join(slow)}: stored in {half}, computed in "
                 f"{_name(compute[slow[0]])} (no fast {half} math on {devices[slow[0]]})")
    return line


def _name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def component_sizes(checkpoint) -> dict[str, int]:
    """Parameters per component of an opened checkpoint (:func:`kandinsky3.weights.open_checkpoint`), from its
    file headers (:func:`parameter_count` of each component's source)."""
    sources = {"unet": checkpoint.unet_source, "movq": checkpoint.movq_source, "text_encoder": checkpoint.text_source}
    return {name: parameter_count(sources[name]()) for name in COMPONENTS}


def parameter_count(source) -> int:
    """Elements of a component's weights, from file headers and metadata (no tensor data is read): ``source`` is a
    ``TensorSource``, a ``ModelSource`` (U-Net, MoVQ) or a ``TextSource`` (the T5 encoder — not a full T5's decoder —
    plus the projection and null embedding); see :mod:`kandinsky3.weights.sources`."""
    from kandinsky3.lowmem.t5_stream import t5_parameter_count  # here: the weights package imports this package

    if hasattr(source, "t5_folder"):
        conditioning = sum(tensor.numel() for tensor in source.conditioning.values())
        return t5_parameter_count(source.t5_folder, source.t5_variant) + conditioning
    tensors = getattr(source, "tensors", source)
    return sum(math.prod(tensors.meta(key)[0]) for key in tensors)
