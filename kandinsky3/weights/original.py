"""The ai-forever Kandinsky 3.0 / 3.1 checkpoint layouts (docs/architecture.md §2.10, §4.3;
docs/practice.md §7).

A checkpoint folder (a local copy of ``ai-forever/Kandinsky3.1`` or ``ai-forever/Kandinsky3.0``)::

    weights/kandinsky3.pt              {unet, null_embedding}               (3.0: + projections)
    weights/kandinsky3_flash.pt        same, distilled U-Net                (3.1 only)
    weights/kandinsky3_inpainting.pt   same, 9 input channels
    weights/movq.pt                    flat MoVQ state dict
    weights/flan_ul2_encoder/          T5EncoderModel + tokenizer files      (3.1 only)
        projection.pt, projection_flash.pt, projection_inpainting.pt   flat {0.weight, 1.weight, 1.bias}

3.0 keeps the projection inside the U-Net file (``projections``: ``t5.0.weight``, ``t5.1.{weight,bias}``) and reads
its T5 from ``google/flan-ul2`` (a full encoder-decoder checkpoint; only the encoder is loaded). The generation is
told apart by the presence of ``projections``. The U-Net containers are nested (keys are not prefixed) and hold
plain fp32 tensors; every file is read with :func:`kandinsky3.weights.safe_io.load_torch_file`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kandinsky3.weights.safe_io import CheckpointError, load_torch_file
from kandinsky3.weights.sources import Checkpoint, DictSource, ModelSource, TextSource
from kandinsky3.weights.unet_keys import PROJECTION_FROM_3_0

__all__ = [
    "VARIANTS",
    "FLAN_UL2",
    "ENCODER_FOLDER",
    "unet_file_name",
    "projection_file_name",
    "is_original_folder",
    "UNetContainer",
    "read_unet_container",
    "read_flat_file",
    "OriginalCheckpoint",
]

logger = logging.getLogger(__name__)

VARIANTS = ("base", "flash", "inpainting")
_SUFFIX = {"base": "", "flash": "_flash", "inpainting": "_inpainting"}
FLAN_UL2 = "google/flan-ul2"  # the 3.0 text encoder (docs/architecture.md §4.1)
ENCODER_FOLDER = "flan_ul2_encoder"  # the 3.1 text encoder, inside weights/
_CONTAINER_KEYS = ("unet", "null_embedding", "projections")
_PROJECTION_KEYS = ("0.weight", "1.weight", "1.bias")


def check_variant(variant: str | None) -> str:
    """None -> "base"; anything outside VARIANTS is a ValueError."""
    variant = "base" if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def unet_file_name(variant: str | None) -> str:
    """``kandinsky3.pt``, ``kandinsky3_flash.pt`` or ``kandinsky3_inpainting.pt``."""
    return f"kandinsky3{_SUFFIX[check_variant(variant)]}.pt"


def projection_file_name(variant: str | None) -> str:
    """``projection.pt``, ``projection_flash.pt`` or ``projection_inpainting.pt`` (3.1, in the encoder folder)."""
    return f"projection{_SUFFIX[check_variant(variant)]}.pt"


def is_original_folder(root: Path) -> bool:
    """A folder with ``weights/kandinsky3*.pt``."""
    return (root / "weights").is_dir() and any((root / "weights").glob("kandinsky3*.pt"))


@dataclass
class UNetContainer:
    """The entries of an original U-Net file; ``projection`` (flat 0.*/1.* keys) is present only in 3.0 files."""

    path: Path
    unet: DictSource
    null_embedding: torch.Tensor
    projection: dict[str, torch.Tensor] | None

    @property
    def generation(self) -> str:
        return "3.0" if self.projection is not None else "3.1"


def _flat(entry: object, path: Path, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(entry, dict) or not all(isinstance(v, torch.Tensor) for v in entry.values()):
        raise CheckpointError(path, f"entry {name!r} must be a flat dict of tensors")
    return entry


def read_unet_container(path: str | Path) -> UNetContainer:
    """Open ``kandinsky3*.pt``: ``{unet, null_embedding}`` (3.1) or ``{unet, null_embedding, projections}`` (3.0)."""
    path = Path(path)
    data, mmapped = load_torch_file(path)
    if "unet" not in data:
        raise CheckpointError(
            path,
            f"has no 'unet' entry (entries: {sorted(data)}); an original Kandinsky 3 U-Net file holds 'unet' and "
            "'null_embedding' (3.0 files also 'projections')",
        )
    extra = sorted(set(data) - set(_CONTAINER_KEYS))
    if extra:
        logger.warning("%s: ignoring entries %s next to 'unet'", path, extra)
    if not isinstance(data.get("null_embedding"), torch.Tensor):
        raise CheckpointError(path, "has no 'null_embedding' tensor next to 'unet'")
    projection = None
    if "projections" in data:
        projections = _flat(data["projections"], path, "projections")
        if set(projections) != set(PROJECTION_FROM_3_0):
            raise CheckpointError(
                path, f"'projections' must hold exactly {sorted(PROJECTION_FROM_3_0)}, got {sorted(projections)}"
            )
        projection = {PROJECTION_FROM_3_0[key]: tensor for key, tensor in projections.items()}
    unet = DictSource(_flat(data["unet"], path, "unet"), path, mmapped)
    return UNetContainer(path, unet, data["null_embedding"], projection)


def read_flat_file(path: str | Path) -> DictSource:
    """A flat state-dict pickle (``movq.pt``, ``projection*.pt``, T5 ``.bin`` shards)."""
    path = Path(path)
    data, mmapped = load_torch_file(path)
    return DictSource(_flat(data, path, "top level"), path, mmapped)


def read_projection(path: Path) -> dict[str, torch.Tensor]:
    """A 3.1 ``projection*.pt``: exactly ``0.weight``, ``1.weight``, ``1.bias``."""
    source = read_flat_file(path)
    if set(source) != set(_PROJECTION_KEYS):
        raise CheckpointError(
            path, f"a projection file must hold exactly {list(_PROJECTION_KEYS)}, got {sorted(source)}"
        )
    return {key: source[key] for key in _PROJECTION_KEYS}


class OriginalCheckpoint(Checkpoint):
    """A local ai-forever checkpoint folder for one variant ("base", "flash" or "inpainting").

    ``t5_resolver`` turns the 3.0 text-encoder repo id (``google/flan-ul2``) into a local folder; it is only
    called when the text encoder is requested and neither ``t5_path`` nor ``weights/flan_ul2_encoder/`` exists.
    The U-Net file is opened (memory-mapped) anew by each ``*_source`` call rather than kept open, so a checkpoint
    object held between loads (disk offload) keeps no file pages mapped.
    """

    layout = "original"
    conditioning = "original"

    def __init__(
        self,
        root: str | Path,
        variant: str | None = None,
        *,
        t5_path: str | Path | None = None,
        t5_resolver: Callable[[str], Path] | None = None,
    ):
        self.root = Path(root)
        self.variant = check_variant(variant)
        self.weights = self.root / "weights"
        self.unet_path = self.weights / unet_file_name(self.variant)
        if not self.unet_path.is_file():
            present = sorted(p.name for p in self.weights.glob("kandinsky3*.pt"))
            raise CheckpointError(
                self.root, f"variant {self.variant!r} needs weights/{self.unet_path.name}; present: {present}"
            )
        self.t5_path = None if t5_path is None else Path(t5_path)
        self.t5_resolver = t5_resolver
        self._generation: str | None = None

    def _container(self) -> UNetContainer:
        container = read_unet_container(self.unet_path)
        self._generation = container.generation
        return container

    @property
    def generation(self) -> str:
        """"3.0" or "3.1", from the presence of ``projections`` in the U-Net file."""
        return self._generation or self._container().generation

    def unet_source(self) -> ModelSource:
        return ModelSource(self._container().unet)

    def movq_source(self) -> ModelSource:
        return ModelSource(read_flat_file(self.weights / "movq.pt"))

    def text_source(self) -> TextSource:
        container = self._container()
        files = [container.path]
        if container.projection is not None:
            projection = container.projection
        else:
            projection_path = self.weights / ENCODER_FOLDER / projection_file_name(self.variant)
            projection = read_projection(projection_path)
            files.append(projection_path)
        conditioning = {f"projection.{key}": tensor for key, tensor in projection.items()}
        conditioning["null_embedding"] = container.null_embedding
        t5_folder = self._t5_folder()
        return TextSource(t5_folder, t5_folder, conditioning, conditioning_files=files)

    def _t5_folder(self) -> Path:
        if self.t5_path is not None:
            return self.t5_path
        encoder = self.weights / ENCODER_FOLDER
        if (encoder / "config.json").is_file():
            return encoder
        if self.generation == "3.1":
            raise CheckpointError(self.root, f"the 3.1 text encoder folder weights/{ENCODER_FOLDER}/ is missing")
        if self.t5_resolver is None:
            raise CheckpointError(
                self.root, f"a 3.0 checkpoint reads its T5 from {FLAN_UL2}; pass t5_path= (a local copy of it)"
            )
        return self.t5_resolver(FLAN_UL2)
