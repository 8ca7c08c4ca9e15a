"""Factories with the original project's names: load weights, place them, build a pipeline.

    get_T2I_pipeline("cuda", fp16=True)                        # the seed README (3.0 style)
    get_T2I_pipeline({"unet": "cuda:0", "text_encoder": "cuda:1", "movq": "cuda:0"},
                     dtype_map={"unet": torch.float16, "text_encoder": torch.bfloat16, "movq": torch.float32})
    get_T2I_pipeline("cpu", model="tiny")                      # the small model shipped in the package

``model`` is a Hub repo id (default: the official 3.1 weights), a local folder in any supported
layout (original 3.0/3.1, diffusers, native) or "tiny".  ``unet_path`` / ``movq_path`` /
``text_encoder_path`` replace single components (files or folders).  ``load_options`` are passed
to :func:`kandinsky3.weights.load_components`: ``head_dim``, ``groups``, ``norm_groups`` (needed
only for small original-layout files, whose configs are inferred from shapes), ``unet_config``,
``movq_config``, ``t5_path`` (the T5 folder of a 3.0 checkpoint), ``stream_t5`` (default "auto": the T5
encoder runs block by block from its files when it would take more than a third of its device's free
memory — the 17 GB Flan-UL2 encoder on a 24 GB machine or a 16 GB GPU; True/False force it;
``t5_prefetch=False`` saves one more block at some speed), ``compute_dtype`` (weights stay in their
``dtype_map`` dtype, layers compute in this one: ``dtype_map=torch.bfloat16, compute_dtype=torch.float32``
halves the memory on CPUs whose bf16 math is slow, see :mod:`kandinsky3.models.storage`).
``offload=True`` keeps every component on the CPU and moves each to its ``device_map`` device only
while it runs. ``offload="disk"`` keeps the U-Net and the MoVQ nowhere between phases: each is read from
the checkpoint files (straight to its device and dtype) when its phase starts and dropped when it ends,
and T5 streams (``stream_t5`` defaults to True): the least memory — the largest component alone — for
re-reading the U-Net at every call (see :mod:`kandinsky3.pipelines.residency`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

from ..models.storage import compute_dtype, compute_in
from ..weights import hub, load_components, load_movq, load_text_encoder, load_unet
from .img2img import Kandinsky3Img2ImgPipeline
from .inpainting import Kandinsky3InpaintingPipeline
from .text_to_image import Kandinsky3Pipeline

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "get_T2I_pipeline",
    "get_T2I_Flash_pipeline",
    "get_inpainting_pipeline",
    "get_img2img_pipeline",
    "resolve_model",
]

DEFAULT_MODEL = "ai-forever/Kandinsky3.1"
COMPONENT_NAMES = ("unet", "text_encoder", "movq")
TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}


def resolve_model(model: str | Path, variant: str = "base") -> str | Path:
    """``"tiny"`` → the bundled small model's folder (the inpainting one for that variant)."""
    if str(model) != "tiny":
        return model
    folder = TINY_MODEL / ("inpainting" if variant == "inpainting" else "base")
    if not (folder / "kandinsky3.json").is_file():
        raise FileNotFoundError(
            f"the bundled tiny model is missing from {folder}; reinstall the package or pass model=<path>"
        )
    return folder


def _as_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"unknown dtype {value!r}; use torch.float32/float16/bfloat16 or 'fp32'/'fp16'/'bf16'")


def placement(device_map: Any, dtype_map: Any, fp16: bool, tiny: bool) -> dict[str, tuple[torch.device, torch.dtype]]:
    """(device, dtype) per component from a device or a {component: device} dict and a dtype or dict.

    Defaults: fp32 for the U-Net and MoVQ; the 8.6B T5 in fp16 on CUDA and bf16 on the CPU (the
    original's fp16 T5 overflows without a guard; bf16 is the safe low precision), fp32 for the
    tiny model.  ``fp16=True`` (3.0 style) puts the U-Net and MoVQ in fp16 too.
    """
    devices = _per_component(device_map, "device_map", torch.device)
    if dtype_map is not None and fp16:
        raise ValueError("pass either fp16=True or dtype_map, not both")
    if dtype_map is not None:
        dtypes = _per_component(dtype_map, "dtype_map", _as_dtype)
    else:
        dtypes = {}
        for name in COMPONENT_NAMES:
            if tiny:
                dtypes[name] = torch.float32
            elif name == "text_encoder":
                dtypes[name] = torch.float16 if devices[name].type == "cuda" else torch.bfloat16
            else:
                dtypes[name] = torch.float16 if fp16 else torch.float32
    return {name: (devices[name], dtypes[name]) for name in COMPONENT_NAMES}


def _per_component(value: Any, what: str, convert) -> dict[str, Any]:
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(COMPONENT_NAMES))
        missing = sorted(set(COMPONENT_NAMES) - set(value))
        if unknown or missing:
            raise ValueError(f"{what} needs exactly the keys {list(COMPONENT_NAMES)}; unknown {unknown}, missing {missing}")
        return {name: convert(value[name]) for name in COMPONENT_NAMES}
    return {name: convert(value) for name in COMPONENT_NAMES}


_UNET_OPTIONS = ("unet_config", "head_dim", "groups")
_MOVQ_OPTIONS = ("movq_config", "norm_groups")


def _load_one(name, model, variant, device, dtype, override, options):
    """Load one component with its device and dtype; returns (module, conditioning or None, scheduler_config)."""
    if override is not None:
        if name == "unet":
            hints = {k.replace("unet_", ""): v for k, v in options.items() if k in _UNET_OPTIONS}
            return load_unet(override, variant=variant, dtype=dtype, device=device, **hints), None, None
        if name == "movq":
            hints = {k.replace("movq_", ""): v for k, v in options.items() if k in _MOVQ_OPTIONS}
            return load_movq(override, dtype=dtype, device=device, **hints), None, None
        encoder = load_text_encoder(
            override, variant=variant, dtype=dtype, device=device, t5_path=options.get("t5_path"),
            stream_t5=options.get("stream_t5", "auto"), t5_prefetch=options.get("t5_prefetch", True),
        )
        return encoder, None, None
    parts = load_components(model, variant=variant, dtype=dtype, device=device, components=(name,),
                            **{"stream_t5": "auto", **options})
    conditioning = parts.conditioning if name == "text_encoder" else None
    return getattr(parts, name), conditioning, parts.scheduler_config


def _prepare(name: str, network: torch.nn.Module, device: torch.device, compute: torch.dtype | None):
    """Inference settings applied after loading: the compute dtype; channels-last for a MoVQ on the CPU
    (decode_latents runs the decoder channels-last there)."""
    if compute is not None and compute_dtype(network) != compute:
        compute_in(network, compute)
    if name == "movq" and device.type == "cpu":
        network.to(memory_format=torch.channels_last)
    return network


def _build(kind: str, device_map, fp16, dtype_map, model, unet_path, movq_path, text_encoder_path, options, offload,
           unsupported):
    allowed = {"unet_config", "movq_config", "head_dim", "groups", "norm_groups", "t5_path", "stream_t5",
               "t5_prefetch", "compute_dtype"}
    options = dict(options or {})
    if set(options) - allowed:
        raise TypeError(f"unknown load_options {sorted(set(options) - allowed)}; allowed: {sorted(allowed)}")
    if unsupported:
        raise TypeError(
            f"unsupported arguments {sorted(unsupported)}; 8/4-bit loading is not available — "
            "use dtype_map with torch.bfloat16/float16 instead"
        )
    if offload not in (True, False, "disk"):
        raise ValueError(f"offload must be True, False or 'disk', got {offload!r}")
    variant = {"t2i": "base", "img2img": "base", "flash": "flash", "inpainting": "inpainting"}[kind]
    places = placement(device_map, dtype_map, fp16, tiny=str(model) == "tiny")
    offload_map = {name: device for name, (device, _) in places.items()} if offload is True else None
    if offload is True:  # load on the CPU; each component visits its device only while it runs
        places = {name: (torch.device("cpu"), dtype) for name, (_, dtype) in places.items()}
    compute = options.pop("compute_dtype", None)
    compute = None if compute is None else _as_dtype(compute)
    model = resolve_model(model, variant)
    if offload == "disk":
        options.setdefault("stream_t5", True)  # the streamed T5 is the on-disk text encoder
        if hub.is_repo_id(str(model)):  # resolve (and download) once, not at every reload
            model = hub.resolve(str(model), components=COMPONENT_NAMES, variant=variant)
    overrides = {"unet": unet_path, "movq": movq_path, "text_encoder": text_encoder_path}
    components, reload = {}, {}
    conditioning, scheduler_config = "original", None
    for name in COMPONENT_NAMES:
        device, dtype = places[name]
        load = functools.partial(_load_one, name, model, variant, device, dtype, overrides[name], options)
        if offload == "disk" and name != "text_encoder":
            # a skeleton on the meta device now (no tensor data is read); the weights at each phase
            network, found_conditioning, found_scheduler = _load_one(
                name, model, variant, "meta", dtype, overrides[name], options)
            network = _prepare(name, network, device, compute)
            reload[name] = functools.partial(_reload, load, name, device, compute)
        else:
            network, found_conditioning, found_scheduler = load()
            network = _prepare(name, network, device, compute)
        components[name] = network
        conditioning = found_conditioning or conditioning
        scheduler_config = found_scheduler if found_scheduler is not None else scheduler_config
    args = (components["unet"], components["movq"], components["text_encoder"])
    residency = {"offload": offload_map, "reload": reload or None}
    if kind == "inpainting":
        return Kandinsky3InpaintingPipeline(*args, conditioning=conditioning, **residency)
    cls = Kandinsky3Img2ImgPipeline if kind == "img2img" else Kandinsky3Pipeline
    return cls(*args, conditioning=conditioning, scheduler_config=scheduler_config, flash=kind == "flash",
               **residency)


def _reload(load, name: str, device: torch.device, compute: torch.dtype | None) -> torch.nn.Module:
    return _prepare(name, load()[0], device, compute)


def get_T2I_pipeline(
    device_map: Any = "cpu",
    fp16: bool = False,
    *,
    dtype_map: Any = None,
    model: str | Path = DEFAULT_MODEL,
    unet_path: str | Path | None = None,
    movq_path: str | Path | None = None,
    text_encoder_path: str | Path | None = None,
    load_options: dict[str, Any] | None = None,
    offload: bool | str = False,
    **unsupported: Any,
) -> Kandinsky3Pipeline:
    """Text-to-image pipeline.  ``device_map``/``dtype_map`` take one value or a dict with the
    keys "unet", "text_encoder", "movq" (the 3.1 API); ``fp16=True`` is the 3.0 API."""
    return _build("t2i", device_map, fp16, dtype_map, model, unet_path, movq_path, text_encoder_path, load_options, offload,
                  unsupported)


def get_T2I_Flash_pipeline(
    device_map: Any = "cpu",
    fp16: bool = False,
    *,
    dtype_map: Any = None,
    model: str | Path = DEFAULT_MODEL,
    unet_path: str | Path | None = None,
    movq_path: str | Path | None = None,
    text_encoder_path: str | Path | None = None,
    load_options: dict[str, Any] | None = None,
    offload: bool | str = False,
    **unsupported: Any,
) -> Kandinsky3Pipeline:
    """Kandinsky Flash (3.1's distilled U-Net and ``projection_flash``): 4 steps, no guidance."""
    return _build("flash", device_map, fp16, dtype_map, model, unet_path, movq_path, text_encoder_path, load_options, offload,
                  unsupported)


def get_inpainting_pipeline(
    device_map: Any = "cpu",
    fp16: bool = False,
    *,
    dtype_map: Any = None,
    model: str | Path = DEFAULT_MODEL,
    unet_path: str | Path | None = None,
    movq_path: str | Path | None = None,
    text_encoder_path: str | Path | None = None,
    load_options: dict[str, Any] | None = None,
    offload: bool | str = False,
    **unsupported: Any,
) -> Kandinsky3InpaintingPipeline:
    """Inpainting pipeline (9-channel U-Net, ``projection_inpainting``); mask 1 = repaint."""
    return _build("inpainting", device_map, fp16, dtype_map, model, unet_path, movq_path, text_encoder_path, load_options, offload,
                  unsupported)


def get_img2img_pipeline(
    device_map: Any = "cpu",
    fp16: bool = False,
    *,
    dtype_map: Any = None,
    model: str | Path = DEFAULT_MODEL,
    unet_path: str | Path | None = None,
    movq_path: str | Path | None = None,
    text_encoder_path: str | Path | None = None,
    load_options: dict[str, Any] | None = None,
    offload: bool | str = False,
    **unsupported: Any,
) -> Kandinsky3Img2ImgPipeline:
    """Img2img pipeline over the base weights (diffusers' strength semantics)."""
    return _build("img2img", device_map, fp16, dtype_map, model, unet_path, movq_path, text_encoder_path, load_options, offload,
                  unsupported)
