"""What a generation will need, estimated from the configs before anything runs: peak memory per phase and time per
U-Net step.

Memory. Activations, in bytes, of the two phases whose memory grows with the image (the weights are the
placement's business, :mod:`kandinsky3.lowmem.placement`):

    U-Net step:   rows · h·w · Σ_l C_l / 4^l · UNET_LIVE_MAPS · a
    MoVQ decode:  s · H·W · C_0 · MOVQ_LIVE_MAPS · a

``rows`` is the images of one U-Net batch (``bs``, else all), doubled with guidance; h×w the latent size; C_l the
U-Net's width at level l (``model_channels · dim_mult[l]``), which works on h·w/4^l latent pixels; ``s`` the
images decoded at once (``decode_slice_size``; the MoVQ encode of img2img and inpainting, one image at a time, is
lighter than the decode); H×W the image in pixels, or one decode tile when decoding in tiles; C_0 the MoVQ's
full-resolution width (``ch · ch_mult[0]``); ``a`` the bytes of one element in the phase's compute dtype. The
factors count the feature maps of that width alive at the peak, measured as peak RSS above the weights on the CPU:
6.4–6.8 for MoVQ decodes at 512 and 1024 px, 12–17 for a U-Net step at 512–1024 px; both rounded up. Attention
is assumed to run in PyTorch's memory-efficient SDPA kernels (memory linear in the tokens), as it does on the CPU
and for the U-Net's 64-wide heads on CUDA.

A call is refused when a phase's activations plus the weights still to be loaded for it (``ModelFacts.
pending_bytes``) exceed what its device has free (:func:`~kandinsky3.lowmem.memory.available_bytes`); the error
gives the estimate and the largest size of the same aspect ratio that fits.

Time. One U-Net step costs the network's FLOPs at that size (counted once per size by running the network on the
meta device under :class:`torch.utils.flop_counter.FlopCounterMode`: no memory, no arithmetic), run at 80 % of
the device's measured matrix-product rate (convolutions reach 85–89 % of it on the CPU, benchmarks/README.md).
For sizes far above the model's native one (over ``SLOW_PIXEL_RATIO`` times its pixels) the estimate is logged
as a warning before the call starts.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UsageError
from ..lowmem.memory import available_bytes
from ..models.unet import UNet
from ..models.unet_config import UNetConfig

if TYPE_CHECKING:
    from .checks import ModelFacts

logger = logging.getLogger(__name__)

__all__ = [
    "MOVQ_LIVE_MAPS", "SLOW_PIXEL_RATIO", "UNET_LIVE_MAPS", "Workload", "activation_bytes", "check_memory",
    "log_step_time", "step_seconds",
]

UNET_LIVE_MAPS = 16  # full-width feature maps alive at a U-Net step's peak (measured 12–17)
MOVQ_LIVE_MAPS = 8  # full-resolution feature maps alive at a MoVQ decode's peak (measured 6.4–6.8)
SLOW_PIXEL_RATIO = 4  # sizes with more than this many times the native pixels get a time estimate in the log
GEMM_EFFICIENCY = 0.8  # share of the matrix-product rate a U-Net step reaches
CONTEXT_TOKENS = 64  # text tokens assumed when counting FLOPs (cross-attention is a small share)
PHASES = {"unet": "U-Net step", "movq": "MoVQ decode"}
GIB = 2**30


@dataclass(frozen=True)
class Workload:
    """One call's shape: image ``width`` × ``height`` pixels, ``unet_rows`` rows per U-Net batch (guided rows
    counted twice), ``decode_images`` images per MoVQ decode, ``steps`` U-Net steps."""

    width: int
    height: int
    unet_rows: int
    decode_images: int
    steps: int


def activation_bytes(facts: ModelFacts, load: Workload) -> dict[str, int]:
    """{"unet": bytes, "movq": bytes}: the peak activations of each phase (the formulas of the module docstring)."""
    unet, movq = facts.unet_config, facts.movq_config
    f = facts.latent_factor
    h, w = load.height // f, load.width // f
    widths = sum(width / 4**level for level, width in enumerate(unet.block_out_channels))
    unet_bytes = load.unet_rows * h * w * widths * UNET_LIVE_MAPS * _itemsize(facts, "unet")
    pixels = load.width * load.height if facts.decode_tile is None else (facts.decode_tile * f) ** 2
    movq_bytes = load.decode_images * pixels * movq.widths[0] * MOVQ_LIVE_MAPS * _itemsize(facts, "movq")
    return {"unet": int(unet_bytes), "movq": int(movq_bytes)}


def _itemsize(facts: ModelFacts, phase: str) -> int:
    return facts.compute_dtypes[phase].itemsize


def check_memory(facts: ModelFacts, load: Workload, free: Callable[[torch.device], int] = available_bytes) -> int:
    """The estimated peak of the call (its largest phase, in bytes); a UsageError when a phase would not fit its
    device: the error gives the estimate, the free memory and the largest size of the same aspect ratio that
    fits. ``free(device)`` is the device's free memory (default: measured now)."""
    budget = {phase: free(facts.devices[phase]) - facts.pending_bytes[phase] for phase in PHASES}
    need = activation_bytes(facts, load)
    short = [phase for phase in PHASES if need[phase] > budget[phase]]
    if short:
        phase = max(short, key=lambda name: need[name] - budget[name])  # the phase furthest over
        device = facts.devices[phase]
        pending = facts.pending_bytes[phase]
        weights = f" + {_gib(pending)} of weights to load" if pending else ""
        raise UsageError(
            f"{load.width}x{load.height} needs about {_gib(need[phase] + pending)} for the {PHASES[phase]} on "
            f"{device} (activations {_gib(need[phase])}{weights}), but {device} has {_gib(free(device))} free; "
            f"{_what_fits(facts, load, budget, phase)}")
    return max(need[phase] + facts.pending_bytes[phase] for phase in PHASES)


def _what_fits(facts: ModelFacts, load: Workload, budget: dict[str, int], phase: str) -> str:
    """The advice of a refusal: the largest size of the same aspect ratio that fits (and the other remedies)."""
    size = _largest_fitting(facts, load, budget)
    remedy = {"unet": "fewer images per U-Net batch (bs=1)" if load.unet_rows > 2 else "a smaller compute dtype",
              "movq": "decoding in tiles (pipe.decode_tiling = DecodeTiling(), CLI --decode-tile 64)"}[phase]
    if size is None:
        return f"no size fits: free memory first, or try {remedy}"
    ratio = math.gcd(load.width, load.height)
    return (f"the largest size of this aspect ratio ({load.width // ratio}:{load.height // ratio}) that fits is "
            f"{size[0]}x{size[1]}; or try {remedy}")


def _largest_fitting(facts: ModelFacts, load: Workload, budget: dict[str, int]) -> tuple[int, int] | None:
    """The largest (width, height) of ``load``'s aspect ratio, in multiples of the model's size multiple, whose
    phases all fit ``budget``; None when not even the smallest does (bisection on the scale: the need grows with
    the size)."""
    multiple = facts.size_multiple

    def size(scale: float) -> tuple[int, int]:
        return (max(multiple, int(load.width * scale) // multiple * multiple),
                max(multiple, int(load.height * scale) // multiple * multiple))

    def fits(scale: float) -> bool:
        width, height = size(scale)
        need = activation_bytes(facts, Workload(width, height, load.unet_rows, load.decode_images, load.steps))
        return all(need[phase] <= budget[phase] for phase in PHASES)

    if not fits(0.0):
        return None
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return size(low)


def _gib(size: float) -> str:
    if size >= 2**40:
        return f"{size / 2**40:.1f} TiB"
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------------- time


@functools.lru_cache(maxsize=16)
def unet_flops(config: UNetConfig, rows: int, height: int, width: int) -> int:
    """FLOPs of one U-Net call on ``rows`` latents of ``height`` × ``width`` (counted on the meta device)."""
    with torch.device("meta"):
        network = UNet(config)
        x = torch.zeros(rows, config.num_channels, height, width)
        t = torch.zeros(rows, dtype=torch.long)
        context = torch.zeros(rows, CONTEXT_TOKENS, config.context_dim)
        mask = torch.ones(rows, CONTEXT_TOKENS, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(x, t, context, mask)
    return counter.get_total_flops()


@functools.cache
def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matrix product in ``dtype`` on ``device`` (best of three after a warm-up)."""
    side = 2048 if device.type == "cuda" else 512
    a = torch.ones(side, side, dtype=dtype, device=device)
    best = math.inf
    for _ in range(4):
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * side**3 / max(best, 1e-9)


def step_seconds(facts: ModelFacts, load: Workload) -> float:
    """Estimated seconds of one U-Net step of the whole call (every mini-batch) on the U-Net's device."""
    f = facts.latent_factor
    flops = unet_flops(facts.unet_config, load.unet_rows, load.height // f, load.width // f)
    rate = matmul_rate(facts.devices["unet"], facts.compute_dtypes["unet"])
    return flops / (GEMM_EFFICIENCY * rate)


_logged: set[tuple] = set()


def log_step_time(facts: ModelFacts, load: Workload, batches: int) -> None:
    """Warn, once per size and device, with the estimated time per step when the size is far above the model's
    native one (``SLOW_PIXEL_RATIO``); ``batches`` U-Net mini-batches make one step."""
    native = facts.sampling_defaults.width * facts.sampling_defaults.height
    ratio = load.width * load.height / native
    key = (load.width, load.height, load.unet_rows, batches, str(facts.devices["unet"]))
    if ratio <= SLOW_PIXEL_RATIO or key in _logged:
        return
    _logged.add(key)
    seconds = step_seconds(facts, load) * batches
    logger.warning(
        "%dx%d is %.0f× the pixels of the model's native %dx%d: about %s per step on %s, %s for %d steps "
        "(estimated from the U-Net's FLOPs at this size)", load.width, load.height, ratio,
        facts.sampling_defaults.width, facts.sampling_defaults.height, _duration(seconds), facts.devices["unet"],
        _duration(seconds * load.steps), load.steps)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
