"""Training data: image-caption datasets, the deterministic global batch order, per-step randomness.

Datasets return ``(image, caption)`` with image (3,S,S) float32 in [-1,1] and caption a str:

- the synthetic shapes set, :class:`kandinsky3.data.shapes.ShapesDataset`;
- :class:`FolderDataset`, images plus a captions file.

Determinism. Everything random about optimizer step ``s`` is a pure function of ``(seed, s)``:

- :func:`global_batch_indices` gives the ``batch_size`` dataset indices of step s (one seeded
  permutation per epoch), and :func:`micro_slices` cuts that global batch into the part of each
  process and accumulation micro-step;
- :func:`step_generator` gives the generator from which a trainer draws the step's noise,
  timesteps and dropout for the *whole* global batch before slicing its own part;
  :func:`sample_generator` gives one generator per global sample position (inpainting masks).

So a resumed run continues exactly (the checkpoint needs only the step), and a run on two processes
sees the same global batch and the same random draws as a run on one. No per-rank seed offset
exists: offsetting would make the result depend on the number of processes.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "FolderDataset",
    "build_dataset",
    "dataset_captions",
    "global_batch_indices",
    "micro_slices",
    "step_generator",
    "sample_generator",
    "load_batch",
    "materialize_images",
    "batch_source",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Stream ids that keep the generators of different purposes independent.
STREAM_EPOCH, STREAM_STEP, STREAM_SAMPLE = 0, 1, 2


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
            record = json.loads(line)
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


def build_dataset(config: Any, split: str = "train") -> Dataset:
    """The dataset a run config names (``config.dataset``: "shapes" or "folder")."""
    if config.dataset == "folder":
        return FolderDataset(config.data_root, config.image_size)
    from ..data.shapes import ShapesDataset

    return ShapesDataset(config.num_samples, image_size=config.image_size, seed=config.data_seed, split=split)


def dataset_captions(dataset: Dataset) -> list[str]:
    """Every caption of ``dataset``: its ``caption(i)`` method if it has one, else ``dataset[i][1]``."""
    caption = getattr(dataset, "caption", None)
    if callable(caption):
        return [caption(i) for i in range(len(dataset))]
    return [dataset[i][1] for i in range(len(dataset))]


# ------------------------------------------------------------------------------------ determinism


def _seed_of(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy SeedSequence: nearby keys give unrelated seeds)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seed_of(seed, STREAM_EPOCH, epoch))
    return torch.randperm(num_samples, generator=generator)


def global_batch_indices(seed: int, step: int, batch_size: int, num_samples: int) -> torch.Tensor:
    """(batch_size,) int64 dataset indices of optimizer step ``step``, a pure function of its arguments.

    Step s takes positions [s·B, (s+1)·B) of the endless sequence "permutation of epoch 0, then of
    epoch 1, ...", each epoch's permutation drawn from a generator seeded by (seed, epoch).
    """
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_samples, positions % num_samples
    out = torch.empty(batch_size, dtype=torch.int64)
    for epoch in epochs.unique().tolist():
        chosen = epochs == epoch
        out[chosen] = _epoch_permutation(seed, epoch, num_samples)[offsets[chosen]]
    return out


def micro_slices(batch_size: int, rank: int, world_size: int, grad_accum: int) -> list[slice]:
    """Global batch positions of each accumulation micro-step of process ``rank``.

    The global batch is cut into ``world_size`` contiguous parts (rank r takes part r), each cut
    into ``grad_accum`` contiguous micro-batches. All micro-batches have the same size, so averaging
    the per-micro-batch mean losses over micro-steps and ranks is the mean over the global batch.
    """
    if batch_size % (world_size * grad_accum):
        raise ValueError(
            f"batch_size {batch_size} is not divisible by world_size {world_size} × grad_accum {grad_accum}"
        )
    micro = batch_size // (world_size * grad_accum)
    start = rank * micro * grad_accum
    return [slice(start + m * micro, start + (m + 1) * micro) for m in range(grad_accum)]


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of optimizer step ``step``: a trainer draws the whole global batch's noise from it."""
    return torch.Generator(device).manual_seed(_seed_of(seed, STREAM_STEP, step))


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """A CPU generator for global batch position ``position`` of step ``step`` (e.g. its inpainting mask)."""
    return torch.Generator().manual_seed(_seed_of(seed, STREAM_SAMPLE, step, position))


# ------------------------------------------------------------------------------------ loading


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

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        chosen = self.images[indices]
        if chosen.dtype == torch.uint8:
            chosen = chosen.float().div_(127.5).sub_(1.0)  # the arithmetic of shapes.image_to_tensor
        return chosen, [self.captions[i] for i in indices.tolist()]


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


def batch_source(dataset: Dataset, materialize: bool) -> MaterializedImages | DatasetBatches:
    """What a trainer indexes with a step's dataset indices: in-memory images or on-demand reads."""
    return materialize_images(dataset) if materialize else DatasetBatches(dataset)
