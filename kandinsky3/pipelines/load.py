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
from ..weights.loading import component_source
from .img2img import Kandinsky3Img2ImgPipeline
from .inpainting import Kandinsky3InpaintingPipeline
from .text_to_image import Kandinsky3Pipeline

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL", "TASKS", "LoadOptions", "load_pipeline", "legacy_options", "resolve_devices", "resolve_model",
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


def load_pipeline(
    task: str,
    model: str | Path = DEFAULT_MODEL,
    *,
    device: Any = "auto",
    options: LoadOptions = LoadOptions(),
) -> Pipeline:
    """The ``task`` pipeline over ``model``'s weights, placed on ``device`` (see the module docstring).

    Bad arguments raise :class:`~kandinsky3.errors.UsageError` (a ValueError) naming the value, checkpoint problems
    :class:`~kandinsky3.weights.CheckpointError`, missing paths FileNotFoundError.
    """
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
    plan = plan_placement(
        devices, {name: parameter_count(source) for name, source in sources.items()},
        dtype=options.dtype, compute_dtype=options.compute_dtype, stream_t5=options.stream_t5,
        offload=options.offload,
    )
    logger.info("placement: %s", plan.summary)
    home = {name: torch.device("cpu") if plan.offload is True else devices[name] for name in COMPONENTS}
    components, reload = {}, {}
    for name in COMPONENTS:
        if plan.offload == "disk" and name != "text_encoder":
            components[name] = _load(name, where[name], variant, home[name], plan, options, skeleton=True)
            again = checkpoint.root if overrides[name] is None else overrides[name]  # opened afresh at each read
            reload[name] = functools.partial(_load, name, again, variant, home[name], plan, options)
        else:
            components[name] = _load(name, where[name], variant, home[name], plan, options)
    return _assemble(task, components, checkpoint, sources["text_encoder"].style, plan, devices, reload)


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
    if name == "movq" and device.type == "cpu":
        network.to(memory_format=torch.channels_last)  # decode_latents runs the CPU decoder channels-last
    return network


def _assemble(task: str, components: dict, checkpoint: Checkpoint, conditioning: str, plan: Placement,
              devices: dict[str, torch.device], reload: dict) -> Pipeline:
    options = dict(conditioning=conditioning, scheduler_config=checkpoint.scheduler_config,
                   offload=devices if plan.offload is True else None, reload=reload or None,
                   sampling_defaults=checkpoint.sampling_defaults)
    if task == "flash":
        options["flash"] = True
    pipeline = {"inpainting": Kandinsky3InpaintingPipeline, "img2img": Kandinsky3Img2ImgPipeline}.get(
        task, Kandinsky3Pipeline)
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
