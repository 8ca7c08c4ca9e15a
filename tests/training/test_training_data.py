"""Training data: the folder dataset, the deterministic batch order and randomness, in-memory images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.training.image_datasets import DatasetBatches, FolderDataset, materialize_images
from kandinsky3.training.seeding import global_batch_indices, sample_generator, step_generator


def _image(path, width, height, left_colour, right_colour):
    """A width×height image whose left half has one colour and right half another."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = left_colour
    array[:, width // 2:] = right_colour
    Image.fromarray(array).save(path)


def test_folder_dataset_reads_jsonl_resizes_the_short_side_and_center_crops(tmp_path):
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "wide.png", 64, 32, (255, 0, 0), (0, 0, 255))  # 2:1 landscape
    _image(tmp_path / "tall.jpg", 20, 40, (0, 255, 0), (0, 255, 0))
    lines = [{"file": "sub/wide.png", "caption": "red and blue"}, {"file": "tall.jpg", "caption": "green"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = FolderDataset(tmp_path, image_size=16)
    assert len(data) == 2
    image, caption = data[0]
    assert caption == "red and blue" and image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    # short side 32 -> 16, long side 64 -> 32, centre crop keeps columns 8..23: the left half is red
    assert image[0, :, :6].mean() > 0.9 and image[2, :, -6:].mean() > 0.9
    assert data[1][0][1].mean() > 0.9  # green
    assert data.load(0, (8, 16)).shape == (3, 8, 16)
    images, captions = DatasetBatches(data).batch(torch.tensor([1, 0]))
    assert images.shape == (2, 3, 16, 16) and captions == ["green", "red and blue"]


def test_folder_dataset_reads_csv_and_names_missing_files(tmp_path):
    _image(tmp_path / "a.png", 8, 8, (0, 0, 0), (255, 255, 255))
    (tmp_path / "captions.csv").write_text('file,caption\na.png,"a cat, black and white"\n')
    assert FolderDataset(tmp_path, 8)[0][1] == "a cat, black and white"
    (tmp_path / "captions.csv").write_text("file,caption\nb.png,x\n")
    with pytest.raises(FileNotFoundError, match="b.png"):
        FolderDataset(tmp_path, 8)
    (tmp_path / "captions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="captions.jsonl nor captions.csv"):
        FolderDataset(tmp_path, 8)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{"file": "a.png", caption: x}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: not valid JSON"):  # the file and the line
        FolderDataset(tmp_path, 8)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    """Consecutive steps walk through one seeded permutation per epoch; any step can be recomputed alone."""
    steps = [global_batch_indices(seed=1, step=s, batch_size=4, num_samples=10) for s in range(5)]
    flat = torch.cat(steps)
    assert sorted(flat[:10].tolist()) == list(range(10))  # epoch 0
    assert sorted(flat[10:20].tolist()) == list(range(10))  # epoch 1
    assert not torch.equal(flat[:10], flat[10:20])
    assert torch.equal(global_batch_indices(1, 3, 4, 10), steps[3])
    assert not torch.equal(global_batch_indices(2, 0, 4, 10), steps[0])


def test_step_and_sample_generators_are_reproducible_and_distinct():
    a = torch.randn(5, generator=step_generator(0, 7))
    assert torch.equal(a, torch.randn(5, generator=step_generator(0, 7)))
    assert not torch.equal(a, torch.randn(5, generator=step_generator(0, 8)))
    assert not torch.equal(a, torch.randn(5, generator=step_generator(1, 7)))
    b = torch.rand(3, generator=sample_generator(0, 7, 2))
    assert torch.equal(b, torch.rand(3, generator=sample_generator(0, 7, 2)))
    assert not torch.equal(b, torch.rand(3, generator=sample_generator(0, 7, 3)))


def test_materialized_shapes_images_are_8_bit_within_an_ulp():
    """Shapes images are 8-bit levels (their float conversion differs from k/127.5 − 1 by at most one
    float32 ulp near 1, 1.2e-7), so they are held as uint8 and come back within 2e-7."""
    data = ShapesDataset(6, image_size=32, seed=2)
    held = materialize_images(data, chunk=4)
    assert held.images.dtype == torch.uint8 and len(held) == 6
    images, captions = held.batch(torch.tensor([5, 0]))
    assert torch.allclose(images[0], data[5][0], atol=2e-7, rtol=0)
    assert torch.allclose(images[1], data[0][0], atol=2e-7, rtol=0)
    assert captions == [data[5][1], data[0][1]]
