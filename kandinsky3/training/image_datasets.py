"""Image-caption datasets and how a trainer reads them by dataset index.

Datasets return ``(image, caption)`` with image (3,S,S) float32 in [-1,1] and caption a str:
the synthetic shapes set (:class:`kandinsky3.data.shapes.ShapesDataset`) or :class:`FolderDataset`,
images plus a captions file. A trainer reads batches through :func:`training_images`: the whole set
held in memory (:class:`MaterializedImages`, for the shapes set) or read on demand
(:class:`DatasetBatches`, for a folder too large to hold).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UsageError
from .config import DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "FolderDataset",
    "build_dataset",
    "dataset_captions",
    "load_batch",
    "MaterializedImages",
    "DatasetBatches",
    "ImageSource",
    "materialize_images",
    "object_anchors",
    "training_images",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FolderDataset(Dataset):
    """Images and captions from a folder -> ``(image (3,S,S) float32 in [-1,1], caption str)``.

    Layout of ``root`` (one of the two caption files is required)::

        root/captions.jsonl   one JSON object per line: {"file": "cats/001.jpg", "caption": "a cat"}
        root/captions.csv     a header row "file,caption", then one row per image (CSV quoting)
        root/cats/001.jpg     image paths are relative to root (png, jpg, webp, bmp; any mode -> RGB)

    Each image is resized so its short side is S (bicubic, antialiased), then center-cropped to
    S×S (S = ``image_size``); :meth:`load` crops to any (height, width) the same way.
    """

    def __init__(self, root: str | Path, image_size: int):
        self.root = Path(root)
        self.image_size = int(image_size)
        self.items = _read_captions(self.root)
        if not self.items:
            raise ValueError(f"{self.root}: the captions file lists no images")

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        return self.items[index][1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.load(index, (self.image_size, self.image_size)), self.caption(index)

    def load(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        """Image ``index`` as (3,height,width) float32 in [-1,1]: cover-resize, then center-crop."""
        path = self.root / self.items[index][0]
        with Image.open(path) as image:
            image = image.convert("RGB")
            height, width = size
            scale = max(height / image.height, width / image.width)
            resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(resized, Image.BICUBIC, reducing_gap=None)
            left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H,W,3)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3,H,W)


def _read_captions(root: Path) -> list[tuple[str, str]]:
    jsonl, table = root / "captions.jsonl", root / "captions.csv"
    items: list[tuple[str, str]] = []
    if jsonl.is_file():
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{jsonl}:{number}: not valid JSON ({error.msg}): {line[:80]!r}") from None
            if not isinstance(record, dict) or "file" not in record or "caption" not in record:
                raise ValueError(f"{jsonl}:{number}: expected {{\"file\": ..., \"caption\": ...}}, got {line[:80]!r}")
            items.append((str(record["file"]), str(record["caption"])))
    elif table.is_file():
        with table.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{table}: the header must name the columns 'file' and 'caption', "
                                 f"got {reader.fieldnames}")
            items = [(row["file"], row["caption"]) for row in reader]
    else:
        raise FileNotFoundError(f"{root} has neither captions.jsonl nor captions.csv")
    missing = [name for name, _ in items if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} listed images are missing, e.g. {missing[:3]}")
    bad = [name for name, _ in items if Path(name).suffix.lower() not in IMAGE_SUFFIXES]
    if bad:
        raise ValueError(f"{root}: unsupported image types {bad[:3]}; use one of {IMAGE_SUFFIXES}")
    return items


def build_dataset(data: DataConfig) -> Dataset:
    """The dataset a run's data section names: the shapes set or a :class:`FolderDataset`."""
    if data.dataset == "folder":
        return FolderDataset(data.data_root, data.image_size)
    from ..data.shapes import ShapesDataset

    return ShapesDataset(data.num_samples, image_size=data.image_size, seed=data.data_seed,
                         and_captions=data.and_captions, and_order=data.and_order)


def dataset_captions(dataset: Dataset) -> list[str]:
    """Every caption of ``dataset``: its ``caption(i)`` method if it has one, else ``dataset[i][1]``."""
    caption = getattr(dataset, "caption", None)
    if callable(caption):
        return [caption(i) for i in range(len(dataset))]
    return [dataset[i][1] for i in range(len(dataset))]


def load_batch(dataset: Dataset, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Stack ``dataset[i]`` for each index -> (images (b,3,H,W) float32, captions list of b str)."""
    images, captions = [], []
    for index in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
        image, caption = dataset[int(index)]
        images.append(image)
        captions.append(caption)
    return torch.stack(images), captions


class MaterializedImages:
    """All images of a dataset held in memory (uint8 when that is lossless, else float32).

    Indexing with a (b,) index tensor gives (b,3,H,W) float32 in [-1,1]; ``captions`` is the list
    of all captions. Used for the synthetic set, whose images are cheap to hold and slow to redraw.
    """

    def __init__(self, images: torch.Tensor, captions: list[str]):
        self.images, self.captions = images, captions

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[str]]:
        """(b,3,H,W) images and captions; in-memory images have one size, so ``size`` must be None."""
        if size is not None:
            raise ValueError(f"images held in memory have one size; cannot crop them to {size}")
        chosen = self.images[indices]
        if chosen.dtype == torch.uint8:
            chosen = chosen.float().div_(127.5).sub_(1.0)  # the arithmetic of shapes.image_to_tensor
        return chosen, [self.captions[i] for i in indices.tolist()]

    def all_captions(self) -> list[str]:
        return self.captions


def materialize_images(dataset: Dataset, chunk: int = 1024) -> MaterializedImages:
    """Read every item of ``dataset`` once into a :class:`MaterializedImages` (uint8 if within 1e-6)."""
    parts, captions, exact = [], [], True
    for start in range(0, len(dataset), chunk):
        images, texts = load_batch(dataset, range(start, min(start + chunk, len(dataset))))
        as_uint8 = torch.round((images + 1.0) * 127.5).clamp(0, 255)
        exact = exact and float((as_uint8 / 127.5 - 1.0 - images).abs().max()) <= 1e-6
        parts.append(as_uint8.to(torch.uint8) if exact else images)
        captions.extend(texts)
    if not exact:
        logger.info("images are not 8-bit exact; holding them as float32")
        parts = [p.float().div_(127.5).sub_(1.0) if p.dtype == torch.uint8 else p for p in parts]
    return MaterializedImages(torch.cat(parts), captions)


class DatasetBatches:
    """Batches read from a dataset on demand (a folder dataset too large to hold in memory)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: torch.Tensor, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[str]]:
        """(b,3,H,W) images and captions; ``size`` (height, width) crops to that size (FolderDataset.load)."""
        if size is None:
            return load_batch(self.dataset, indices)
        images = torch.stack([self.dataset.load(int(i), size) for i in indices.tolist()])
        return images, [self.dataset.caption(int(i)) for i in indices.tolist()]

    def all_captions(self) -> list[str]:
        return dataset_captions(self.dataset)


ImageSource = Union[MaterializedImages, DatasetBatches]


def training_images(data: DataConfig, dataset: Dataset | None = None) -> ImageSource:
    """What a trainer indexes with a step's dataset indices: ``dataset`` (tests) or the configured one, held in
    memory (given datasets and the shapes set, whose images are cheap to hold and slow to redraw) or read on
    demand (a folder)."""
    source = dataset if dataset is not None else build_dataset(data)
    return materialize_images(source) if dataset is not None or data.dataset == "shapes" else DatasetBatches(source)


def object_anchors(data: DataConfig, dataset: Dataset | None = None) -> list[tuple[tuple[float, float, float], ...]]:
    """Where each item's objects are, as (x, y, r) fractions of the side (anchor and scale), for masks drawn around
    them (inpainting ``data.object_masks``) and the object-weighted loss (``loss.object_weight``): ``dataset``
    (tests) or the configured one must have ``placements(i)``, as the shapes set does."""
    source = dataset if dataset is not None else build_dataset(data)
    placements = getattr(source, "placements", None)
    if not callable(placements):
        raise UsageError("data.object_masks and loss.object_weight need a dataset that says where its objects are "
                         f"(placements(i)); {type(source).__name__} does not")
    return [tuple((p.x, p.y, p.r) for p in placements(i)) for i in range(len(source))]
