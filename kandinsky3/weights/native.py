"""The native kandinsky3 layout: one folder per model, configs as JSON next to safetensors weights.

::

    kandinsky3.json              {"format": "kandinsky3", "format_version": 1, "conditioning": "original"|"diffusers",
                                  "variant": "base"|"flash"|"inpainting", "components": [...],
                                  optional "scheduler_config" (kept from a diffusers source) and "source"}
    unet/config.json             UNetConfig.to_dict()
    unet/model.safetensors       original key names (SPEC §2.10)
    movq/config.json             MoVQConfig.to_dict()
    movq/model.safetensors       original key names (SPEC §3.4)
    text_encoder/                T5EncoderModel config.json + model.safetensors, tokenizer files
    text_encoder/conditioning.safetensors   projection.{0.weight,1.weight,1.bias} [+ null_embedding]

Configs load with ``from_dict``, which rejects unknown and missing keys (STYLE habit 2). Weights are written one
tensor at a time (:func:`kandinsky3.weights.safe_io.write_safetensors`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kandinsky3.weights.build import KINDS, cast, expected_shapes
from kandinsky3.weights.diffusers import read_json
from kandinsky3.weights.original import VARIANTS
from kandinsky3.weights.safe_io import CheckpointError, check_shapes, write_safetensors
from kandinsky3.weights.sources import ModelSource, SafetensorsSource, TextSource

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "CONDITIONING_FILE",
    "is_native_folder",
    "read_manifest",
    "write_manifest",
    "read_component",
    "write_component",
    "write_conditioning",
    "NativeCheckpoint",
]

FORMAT = "kandinsky3"
FORMAT_VERSION = 1
MANIFEST = "kandinsky3.json"
CONDITIONING_FILE = "conditioning.safetensors"
COMPONENTS = ("unet", "movq", "text_encoder")
_REQUIRED = ("format", "format_version", "conditioning", "variant", "components")
_OPTIONAL = ("scheduler_config", "source")


def is_native_folder(root: Path) -> bool:
    return (root / MANIFEST).is_file()


def read_manifest(root: Path) -> dict[str, Any]:
    """Read and validate ``kandinsky3.json``; unknown or missing keys are an error."""
    path = root / MANIFEST
    data = read_json(path)
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    missing = sorted(set(_REQUIRED) - set(data))
    if unknown or missing:
        raise CheckpointError(path, f"unknown keys {unknown}, missing keys {missing}")
    if data["format"] != FORMAT or data["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"format {data['format']!r} version {data['format_version']!r}; this code reads "
            f"{FORMAT!r} version {FORMAT_VERSION}",
        )
    if data["conditioning"] not in ("original", "diffusers") or data["variant"] not in VARIANTS:
        raise CheckpointError(path, f"bad conditioning {data['conditioning']!r} or variant {data['variant']!r}")
    if not set(data["components"]) <= set(COMPONENTS):
        raise CheckpointError(path, f"components {data['components']} are not a subset of {list(COMPONENTS)}")
    return data


def write_manifest(
    root: Path,
    *,
    conditioning: str,
    variant: str,
    components: list[str],
    scheduler_config: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> None:
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "conditioning": conditioning,
        "variant": variant,
        "components": [name for name in COMPONENTS if name in components],
    }
    if scheduler_config is not None:
        data["scheduler_config"] = dict(scheduler_config)
    if source is not None:
        data["source"] = source
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def read_component(folder: Path, kind: str, weights: Path | None = None) -> ModelSource:
    """``folder/config.json`` (from_dict) + ``folder/model.safetensors`` (or ``weights``) of a "unet"/"movq"."""
    config_path = folder / "config.json"
    try:
        config = KINDS[kind][1].from_dict(read_json(config_path))
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(config_path, str(error)) from None
    return ModelSource(SafetensorsSource(weights or folder / "model.safetensors"), config)


def write_component(folder: Path, kind: str, source: ModelSource, dtype: torch.dtype | None) -> None:
    """Stream a "unet" or "movq" source (its ``config`` must be set) into ``folder``; floating tensors -> dtype."""
    expected = expected_shapes(kind, source.config)
    tensors = source.tensors
    check_shapes(tensors.shapes(), expected, tensors.path, {"unet": "U-Net", "movq": "MoVQ"}[kind])
    layout = {}
    for key, shape in expected.items():
        stored = tensors.meta(key)[1]
        layout[key] = (shape, dtype if (dtype is not None and stored.is_floating_point) else stored)

    def fetch(key: str) -> torch.Tensor:
        tensor = cast(tensors[key], layout[key][1])
        tensors.release(key)
        return tensor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(source.config.to_dict(), indent=2) + "\n")
    write_safetensors(folder / "model.safetensors", layout, fetch, {"format": "pt", "kandinsky3": kind})


def write_conditioning(path: Path, conditioning: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """``projection.*`` (+ ``null_embedding`` as a (C,) vector) -> ``conditioning.safetensors``."""
    tensors = {}
    for key, value in conditioning.items():
        value = value.reshape(-1) if key == "null_embedding" else value
        tensors[key] = cast(value.detach(), dtype).contiguous()
    layout = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, layout, tensors.__getitem__, {"format": "pt"})


class NativeCheckpoint:
    """A native folder; ``variant`` (if given) must match the one it records."""

    layout = "native"
    generation = None

    def __init__(self, root: str | Path, variant: str | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if variant is not None and variant != self.manifest["variant"]:
            raise CheckpointError(
                self.root, f"holds the {self.manifest['variant']!r} variant, but variant {variant!r} was requested"
            )
        self.variant = self.manifest["variant"]
        self.conditioning = self.manifest["conditioning"]
        self.scheduler_config = self.manifest.get("scheduler_config")

    def _require(self, component: str) -> Path:
        if component not in self.manifest["components"]:
            present = self.manifest["components"]
            raise CheckpointError(self.root / MANIFEST, f"this folder has no {component} (it has {present})")
        return self.root / component

    def unet_source(self) -> ModelSource:
        return read_component(self._require("unet"), "unet")

    def movq_source(self) -> ModelSource:
        return read_component(self._require("movq"), "movq")

    def text_source(self) -> TextSource:
        folder = self._require("text_encoder")
        source = SafetensorsSource(folder / CONDITIONING_FILE)
        conditioning = {key: source[key] for key in source}
        if (self.conditioning == "original") != ("null_embedding" in conditioning):
            raise CheckpointError(
                source.path,
                f"conditioning {self.conditioning!r} in {MANIFEST} does not match the tensors {sorted(conditioning)}",
            )
        return TextSource(folder, folder, conditioning, conditioning_files=[source.path])
