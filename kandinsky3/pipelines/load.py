"""Build a pipeline from a checkpoint: :func:`load_pipeline` with its typed :class:`LoadOptions`.

    pipe = load_pipeline("text-to-image")                  # ai-forever/Kandinsky3.1, placed for this machine
    pipe = load_pipeline("text-to-image", "tiny")          # the small model shipped in the package (64 px)
    pipe = load_pipeline("inpainting", "path/to/checkpoint", device="cuda")
    pipe = load_pipeline("flash", device={"unet": "cuda:0", "text_encoder": "cuda:1", "movq": "cuda:0"},
                         options=LoadOptions(dtype={"unet": "fp16", "text_encoder": "bf16", "movq": "fp32"}))

``task`` is "text-to-image", "flash" (3.1's distilled U-Net: 4 steps, no guidance), "inpainting" or "img2img".
``model`` is a Hub repo id, a local folder in any supported layout (original 3.0/3.1, diffusers, native) or
"tiny"; its layout is detected once per call. ``device`` is "auto" (CUDA when present, else the CPU), one device,
or a {component: device} dict. What :class:`LoadOptions` leaves unset (storage and compute dtypes, T5 streaming,
offloading) is chosen by :func:`kandinsky3.lowmem.placement.plan_placement` from the component sizes in the
checkpoint's headers and from the machine, and said in one INFO log line.

The seed's factories (``get_T2I_pipeline(device_map, fp16, dtype_map=..., ...)`` and its three siblings) are kept
as wrappers that translate their arguments into these (:func:`legacy_options`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Union

import torch

from ..components import COMPONENTS, parse_dtype
from ..errors import UsageError
from ..lowmem import Placement, compute_dtype, compute_in, parameter_count, plan_placement
from ..models.movq import MoVQConfig
from ..models.unet_config import UNetConfig
from ..weights import Checkpoint, load_movq, load_text_encoder, load_unet, open_checkpoint
from ..weights.build import resolve_config
from ..weights.loading import component_source
from .checks import ModelFacts, default_sampler
from .img2img import Kandinsky3Img2ImgPipeline
from .inpainting import Kandinsky3InpaintingPipeline
from .text_to_image import Kandinsky3Pipeline

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL", "TASKS", "LoadOptions", "inspect_model", "load_pipeline", "legacy_options", "resolve_devices",
    "resolve_model",
    "get_T2I_pipeline", "get_T2I_Flash_pipeline", "get_inpainting_pipeline", "get_img2img_pipeline",
]

DEFAULT_MODEL = "ai-forever/Kandinsky3.1"
TASKS = {"text-to-image": "base", "flash": "flash", "inpainting": "inpainting", "img2img": "base"}  # → variant
TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny"

DType = Union[torch.dtype, str]
Pipeline = Union[Kandinsky3Pipeline, Kandinsky3InpaintingPipeline, Kandinsky3Img2ImgPipeline]


@dataclass(frozen=True)
class LoadOptions:
    """How to load and place a pipeline's components. Every default means "let the loader decide".

    dtype: the storage dtype of every component, or ``{component: dtype}`` for some of them (torch dtypes or
        "fp32"/"fp16"/"bf16"); None: chosen per device (:func:`~kandinsky3.lowmem.placement.plan_placement`).
    compute_dtype: the dtype layers compute in while the weights stay in ``dtype`` (``dtype="bf16",
        compute_dtype="fp32"`` halves the memory at fp32 speed on CPUs without fast bf16), one or per component;
        None: the storage dtype where the device computes it fast, else fp32.
    stream_t5: True runs the T5 encoder block by block from its files, False loads it whole; None: stream when it
        would not fit. t5_prefetch: while streaming, read the next block during the current one (False saves one
        block of memory at some speed).
    offload: True keeps every component on the CPU and moves it to its device only while it runs; "disk" reads
        the U-Net and MoVQ from the files at each phase and drops them after it (the least memory: the largest
        component alone); False keeps all resident; None: resident when the model fits its devices, else waiting
        in host memory (a GPU model that fits there) or on disk.
    unet_path, movq_path, text_encoder_path: replace one component (a file or folder in any layout).
    t5_path: the T5 folder of a 3.0 checkpoint (else google/flan-ul2).
    unet_config, movq_config: replace the checkpoint's configs.
    head_dim, groups (U-Net), norm_groups (MoVQ): used only when a config is inferred from the shapes of small
        original-layout files, which do not determine them.
    """

    dtype: DType | Mapping[str, DType] | None = None
    compute_dtype: DType | Mapping[str, DType] | None = None
    stream_t5: bool | None = None
    t5_prefetch: bool = True
    offload: bool | Literal["disk"] | None = None
    unet_path: str | Path | None = None
    movq_path: str | Path | None = None
    text_encoder_path: str | Path | None = None
    t5_path: str | Path | None = None
    unet_config: UNetConfig | None = None
    movq_config: MoVQConfig | None = None
    head_dim: int = 64
    groups: int = 32
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "dtype", _check_dtypes(self.dtype, "dtype"))
        object.__setattr__(self, "compute_dtype", _check_dtypes(self.compute_dtype, "compute_dtype"))
        if not (self.stream_t5 is None or isinstance(self.stream_t5, bool)):
            raise UsageError(f"LoadOptions.stream_t5 must be True, False or None (decide), got {self.stream_t5!r}")
        if not (self.offload is None or isinstance(self.offload, bool) or self.offload == "disk"):
            raise UsageError(f"LoadOptions.offload must be True, False, 'disk' or None (decide), got {self.offload!r}")
        if not isinstance(self.t5_prefetch, bool):
            raise UsageError(f"LoadOptions.t5_prefetch must be True or False, got {self.t5_prefetch!r}")
        for name in ("unet_path", "movq_path", "text_encoder_path", "t5_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise UsageError(f"LoadOptions.{name} must be a path (str or Path), got {value!r}")
        for name, config_type in (("unet_config", UNetConfig), ("movq_config", MoVQConfig)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, config_type):
                raise UsageError(f"LoadOptions.{name} must be a {config_type.__name__}, got {type(value).__name__}")
        for name in ("head_dim", "groups", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"LoadOptions.{name} must be a positive int, got {value!r}")


def _check_dtypes(value: Any, field: str) -> torch.dtype | Mapping[str, torch.dtype | None] | None:
    """None, one parsed dtype, or a read-only {component: dtype or None} naming only known components."""
    if not isinstance(value, Mapping):
        return _check_dtype(value, field)
    unknown = sorted(set(value) - set(COMPONENTS))
    if unknown:
        raise UsageError(f"LoadOptions.{field} names unknown components {unknown}; choose from {list(COMPONENTS)}")
    return MappingProxyType({name: _check_dtype(value[name], f"{field}[{name!r}]") for name in value})


def _check_dtype(value: Any, field: str) -> torch.dtype | None:
    try:
        return parse_dtype(value)
    except (AttributeError, TypeError, ValueError) as error:
        raise UsageError(f"LoadOptions.{field}: {error}") from None


def resolve_model(model: str | Path, variant: str = "base") -> str | Path:
    """``"tiny"`` → the bundled small model's folder (the inpainting one for that variant); other values as given."""
    if str(model) != "tiny":
        return model
    folder = TINY_MODEL / ("inpainting" if variant == "inpainting" else "base")
    if not (folder / "kandinsky3.json").is_file():
        raise FileNotFoundError(
            f"the bundled tiny model is missing from {folder}; reinstall the package or pass model=<path>"
        )
    return folder


def resolve_devices(device: Any) -> dict[str, torch.device]:
    """{component: torch.device} from "auto", one device or a {component: device} dict.

    "auto" is the current CUDA device when CUDA is present, else the CPU. A CUDA device on a machine without
    one (or past its device count) is a :class:`~kandinsky3.errors.UsageError` here, before anything is loaded.
    """
    if isinstance(device, Mapping):
        unknown, missing = sorted(set(device) - set(COMPONENTS)), sorted(set(COMPONENTS) - set(device))
        if unknown or missing:
            raise UsageError(f"device needs exactly the keys {list(COMPONENTS)}; unknown {unknown}, missing {missing}")
        return {name: _one_device(device[name]) for name in COMPONENTS}
    one = _one_device(device)
    return {name: one for name in COMPONENTS}


def _one_device(value: Any) -> torch.device:
    if isinstance(value, str) and value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {value!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {str(device)!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {str(device)!r} was requested but this machine has no usable MPS device; use "
                         "device='cpu' or 'auto'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {str(device)!r} was requested but this machine has no usable CUDA device "
                             "(torch.cuda.is_available() is False); use device='cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {str(device)!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def _variant(task: str) -> str:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose from {list(TASKS)}")
    return TASKS[task]


@dataclass(frozen=True)
class _Opened:
    """A model opened for a task without reading weights: its checkpoint, where each component comes from
    (the checkpoint or an override path), their lazy sources and parameter counts, the devices and the placement."""

    variant: str
    devices: dict[str, torch.device]
    checkpoint: Checkpoint
    where: dict[str, Any]
    sources: dict[str, Any]
    sizes: dict[str, int]
    plan: Placement


def _open(task: str, model: str | Path, device: Any, options: LoadOptions) -> _Opened:
    """Check the arguments, open the checkpoint (headers only) and plan the placement."""
    if not isinstance(options, LoadOptions):
        raise UsageError(f"options must be a LoadOptions, got {type(options).__name__}")
    variant = _variant(task)
    devices = resolve_devices(device)
    overrides = {"unet": options.unet_path, "movq": options.movq_path, "text_encoder": options.text_encoder_path}
    checkpoint = open_checkpoint(
        resolve_model(model, variant), variant=variant, t5_path=options.t5_path,
        components=tuple(name for name in COMPONENTS if overrides[name] is None),
    )
    where = {name: checkpoint if overrides[name] is None else overrides[name] for name in COMPONENTS}
    sources = {name: _source(name, where[name], variant, options) for name in COMPONENTS}
    sizes = {name: parameter_count(source) for name, source in sources.items()}
    plan = plan_placement(devices, sizes, dtype=options.dtype, compute_dtype=options.compute_dtype,
                          stream_t5=options.stream_t5, offload=options.offload)
    return _Opened(variant, devices, checkpoint, where, sources, sizes, plan)


def load_pipeline(
    task: str,
    model: str | Path = DEFAULT_MODEL,
    *,
    device: Any = "auto",
    options: LoadOptions = LoadOptions(),
) -> Pipeline:
    """The ``task`` pipeline over ``model``'s weights, placed on ``device`` (see the module docstring).

    Bad arguments raise :class:`~kandinsky3.errors.UsageError` (a ValueError) naming the value, checkpoint problems
    :class:`~kandinsky3.weights.CheckpointError`, missing paths FileNotFoundError; all before any weights are read.
    """
    opened = _open(task, model, device, options)
    plan, devices, variant = opened.plan, opened.devices, opened.variant
    logger.info("placement: %s", plan.summary)
    _warn_slow_half(plan, options)
    home = {name: torch.device("cpu") if plan.offload is True else devices[name] for name in COMPONENTS}
    components, reload = {}, {}
    for name in COMPONENTS:
        where = opened.where[name]
        if plan.offload == "disk" and name != "text_encoder":
            components[name] = _load(name, where, variant, home[name], plan, options, skeleton=True)
            again = opened.checkpoint.root if isinstance(where, Checkpoint) else where  # opened afresh at each read
            reload[name] = functools.partial(_load, name, again, variant, home[name], plan, options)
        else:
            components[name] = _load(name, where, variant, home[name], plan, options)
    pipeline = _assemble(task, components, opened.checkpoint, opened.sources["text_encoder"].style, plan, devices,
                         reload)
    pipeline.devices = devices
    return pipeline


def inspect_model(task: str, model: str | Path = DEFAULT_MODEL, *, device: Any = "auto",
                  options: LoadOptions | None = None) -> ModelFacts:
    """The :class:`~kandinsky3.pipelines.checks.ModelFacts` of what ``load_pipeline(task, model, device=device,
    options=options)`` would build, from configs and file headers only (no weights read); the same errors."""
    options = LoadOptions() if options is None else options
    opened = _open(task, model, device, options)
    checkpoint, plan, pipeline = opened.checkpoint, opened.plan, _PIPELINES.get(task, Kandinsky3Pipeline)
    phases = ("unet", "movq")
    return ModelFacts(
        task=task,
        unet_config=resolve_config("unet", opened.sources["unet"], options.unet_config, head_dim=options.head_dim,
                                   groups=options.groups),
        movq_config=resolve_config("movq", opened.sources["movq"], options.movq_config,
                                   norm_groups=options.norm_groups),
        sampling_defaults=checkpoint.sampling_defaults,
        default_sampler=default_sampler(task, checkpoint.sampling_defaults, checkpoint.scheduler_config),
        default_guidance_scale=pipeline.default_guidance_scale, threshold_percentile=pipeline.threshold_percentile,
        scheduler_config=checkpoint.scheduler_config,
        devices=MappingProxyType({phase: opened.devices[phase] for phase in phases}),
        compute_dtypes=MappingProxyType({phase: plan.compute_dtype[phase] for phase in phases}),
        pending_bytes=MappingProxyType({phase: _pending_bytes(opened, phase) for phase in phases}),
    )


def _pending_bytes(opened: _Opened, phase: str) -> int:
    """Bytes of weights on ``phase``'s device while it runs, none of them loaded yet: the phase's component and
    every other one that waits on that device (all of them when resident; the text encoder with disk offload;
    a streamed T5 holds one block at a time and counts nothing)."""
    plan, devices = opened.plan, opened.devices
    weights = {name: 0 if name == "text_encoder" and plan.stream_t5 else
               opened.sizes[name] * plan.storage_dtype[name].itemsize for name in COMPONENTS}

    def waits_on(name: str) -> torch.device | None:
        if plan.offload is True:
            return torch.device("cpu")
        return devices[name] if plan.offload is False or name == "text_encoder" else None

    return weights[phase] + sum(weights[name] for name in COMPONENTS
                                if name != phase and waits_on(name) == devices[phase])


def _warn_slow_half(plan: Placement, options: LoadOptions) -> None:
    """A warning for each component whose half-precision dtype was asked for but is computed in fp32, because
    its device computes half precision slowly (the placement's choice; an explicit compute_dtype says nothing)."""

    def asked(value: Any, name: str) -> bool:
        return value is not None and (not isinstance(value, Mapping) or value.get(name) is not None)

    for name in COMPONENTS:
        storage, compute = plan.storage_dtype[name], plan.compute_dtype[name]
        if storage in (torch.float16, torch.bfloat16) and compute != storage and asked(options.dtype, name) \
                and not asked(options.compute_dtype, name):
            half = str(storage).removeprefix("torch.")
            logger.warning("%s: %s requested, but this device computes %s slowly: the weights are stored in %s "
                           "(half the memory) and computed in %s", name, half, half, half,
                           str(compute).removeprefix("torch."))


def _source(name: str, where: Checkpoint | str | Path, variant: str, options: LoadOptions):
    """Component ``name``'s lazy source (file headers only) in ``where``: the opened checkpoint or an override."""
    t5_path = None if isinstance(where, Checkpoint) else options.t5_path  # an opened checkpoint has its T5 folder
    return component_source(where, name, variant, t5_path=t5_path)


def _load(name: str, where: Checkpoint | str | Path, variant: str, device: torch.device, plan: Placement,
          options: LoadOptions, *, skeleton: bool = False) -> torch.nn.Module:
    """Component ``name`` read from ``where`` (an opened checkpoint, or a path opened afresh) in its planned storage
    dtype on ``device``, computing in its planned compute dtype. ``skeleton``: built on the meta device (the
    checkpoint's shapes and dtypes, no tensor data read), to be filled at each phase (``offload="disk"``)."""
    storage, compute = plan.storage_dtype[name], plan.compute_dtype[name]
    target = torch.device("meta") if skeleton else device
    if name == "unet":
        network = load_unet(where, variant=variant, config=options.unet_config, dtype=storage, device=target,
                            head_dim=options.head_dim, groups=options.groups)
    elif name == "movq":
        network = load_movq(where, config=options.movq_config, dtype=storage, device=target,
                            norm_groups=options.norm_groups)
    else:
        network = load_text_encoder(where, variant=variant, dtype=storage, device=device,
                                    t5_path=None if isinstance(where, Checkpoint) else options.t5_path,
                                    stream_t5=plan.stream_t5, t5_prefetch=options.t5_prefetch)
    if compute_dtype(network) != compute:
        compute_in(network, compute)
    network.requires_grad_(False)  # a pipeline only infers; and a CPU layer picks its kernel by this flag, so a LoRA
    # (whose inject/unload freezes the base) would otherwise move the output by float rounding even at scale 0
    if name == "movq" and device.type == "cpu":
        network.to(memory_format=torch.channels_last)  # decode_latents runs the CPU decoder channels-last
    return network


_PIPELINES = {"inpainting": Kandinsky3InpaintingPipeline, "img2img": Kandinsky3Img2ImgPipeline}  # else text-to-image


def _assemble(task: str, components: dict, checkpoint: Checkpoint, conditioning: str, plan: Placement,
              devices: dict[str, torch.device], reload: dict) -> Pipeline:
    options = dict(conditioning=conditioning, scheduler_config=checkpoint.scheduler_config,
                   offload=devices if plan.offload is True else None, reload=reload or None,
                   sampling_defaults=checkpoint.sampling_defaults)
    if task == "flash":
        options["flash"] = True
    pipeline = _PIPELINES.get(task, Kandinsky3Pipeline)
    return pipeline(components["unet"], components["movq"], components["text_encoder"], **options)


# ----------------------------------------------------------------------------- the seed's factories

_LEGACY_OPTIONS = frozenset(field.name for field in fields(LoadOptions)) - {
    "dtype", "offload", "unet_path", "movq_path", "text_encoder_path"}


def legacy_options(
    device_map: Any = "auto",
    fp16: bool = False,
    *,
    dtype_map: Any = None,
    unet_path: str | Path | None = None,
    movq_path: str | Path | None = None,
    text_encoder_path: str | Path | None = None,
    load_options: Mapping[str, Any] | None = None,
    offload: bool | str | None = None,
    **unsupported: Any,
) -> tuple[Any, LoadOptions]:
    """(device, :class:`LoadOptions`) from the seed factories' arguments.

    ``device_map``/``dtype_map`` take one value or a {"unet", "text_encoder", "movq"} dict (the 3.1 API);
    ``fp16=True`` (the 3.0 API) stores the U-Net and MoVQ in fp16 (computing in fp32 where half-precision math
    is slow, which the placement log line says). ``load_options`` holds further :class:`LoadOptions` fields
    (``stream_t5="auto"`` is None). The 3.1 API's 8/4-bit loading does not exist here: a TypeError.
    """
    if unsupported:
        raise TypeError(f"unsupported arguments {sorted(unsupported)}; 8/4-bit loading is not available — "
                        "use dtype_map with torch.bfloat16/float16 instead")
    extra = dict(load_options or {})
    unknown = sorted(set(extra) - _LEGACY_OPTIONS)
    if unknown:
        raise TypeError(f"unknown load_options {unknown}; allowed: {sorted(_LEGACY_OPTIONS)}")
    if extra.get("stream_t5") == "auto":
        extra["stream_t5"] = None
    if fp16 and dtype_map is not None:
        raise UsageError("pass either fp16=True or dtype_map, not both")
    if fp16:
        dtype_map = {"unet": torch.float16, "movq": torch.float16}
    options = LoadOptions(dtype=dtype_map, offload=offload, unet_path=unet_path, movq_path=movq_path,
                          text_encoder_path=text_encoder_path, **extra)
    return device_map, options


def _legacy(task: str, device_map: Any, fp16: bool, model: str | Path, arguments: dict[str, Any]) -> Pipeline:
    device, options = legacy_options(device_map, fp16, **arguments)
    return load_pipeline(task, model, device=device, options=options)


def get_T2I_pipeline(device_map: Any = "auto", fp16: bool = False, *, model: str | Path = DEFAULT_MODEL,
                     **arguments: Any) -> Kandinsky3Pipeline:
    """``load_pipeline("text-to-image", model, ...)`` with the seed's arguments (:func:`legacy_options`)."""
    return _legacy("text-to-image", device_map, fp16, model, arguments)


def get_T2I_Flash_pipeline(device_map: Any = "auto", fp16: bool = False, *, model: str | Path = DEFAULT_MODEL,
                           **arguments: Any) -> Kandinsky3Pipeline:
    """``load_pipeline("flash", model, ...)``: Kandinsky Flash (3.1's distilled U-Net, 4 steps, no guidance)."""
    return _legacy("flash", device_map, fp16, model, arguments)


def get_inpainting_pipeline(device_map: Any = "auto", fp16: bool = False, *, model: str | Path = DEFAULT_MODEL,
                            **arguments: Any) -> Kandinsky3InpaintingPipeline:
    """``load_pipeline("inpainting", model, ...)``: the 9-channel U-Net; mask 1 = repaint."""
    return _legacy("inpainting", device_map, fp16, model, arguments)


def get_img2img_pipeline(device_map: Any = "auto", fp16: bool = False, *, model: str | Path = DEFAULT_MODEL,
                         **arguments: Any) -> Kandinsky3Img2ImgPipeline:
    """``load_pipeline("img2img", model, ...)``: the base weights, diffusers' strength semantics."""
    return _legacy("img2img", device_map, fp16, model, arguments)
