"""Inpainting training pieces: random masks, GLIDE init (the 9-channel input: tests/test_conditioning.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_models import randomize_
from _tiny_training import UNET, one_thread

from kandinsky3.models.unet import UNet
from kandinsky3.training.initial_models import glide_init_state, load_init_unet
from kandinsky3.data.shapes import COLOURS, ShapesDataset
from kandinsky3.errors import UsageError
from kandinsky3.training.config import load_config
from kandinsky3.training.image_datasets import object_anchors
from kandinsky3.training.inpainting_masks import SHAPE_KINDS, object_mask, random_mask, training_masks

_single_thread = pytest.fixture(autouse=True)(one_thread)

COVERAGE = (0.05, 0.6)


def _components(mask: torch.Tensor) -> int:
    """Number of 4-connected components of a (H,W) 0/1 mask (flood fill)."""
    todo = {(int(y), int(x)) for y, x in mask.nonzero().tolist()}
    count = 0
    while todo:
        count += 1
        stack = [todo.pop()]
        while stack:
            y, x = stack.pop()
            for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if n in todo:
                    todo.remove(n)
                    stack.append(n)
    return count


def test_random_masks_have_1_to_3_shapes_in_the_coverage_range():
    """300 masks at 64×64: coverage inside [5%, 60%], 1-3 shapes, at most as many connected regions as
    shapes, binary values, and every kind (rectangle, ellipse, stroke) and shape count appears."""
    kinds, counts = set(), set()
    for seed in range(300):
        sample = random_mask(64, 64, torch.Generator().manual_seed(seed), COVERAGE)
        assert sample.mask.shape == (64, 64) and sample.mask.dtype == torch.float32
        assert set(sample.mask.unique().tolist()) <= {0.0, 1.0}
        assert COVERAGE[0] <= sample.coverage <= COVERAGE[1], (seed, sample.coverage)
        assert sample.coverage == pytest.approx(float(sample.mask.mean()))
        assert 1 <= len(sample.kinds) <= 3
        if seed < 60:  # flood fill in Python is slow; 60 masks are enough for the topology check
            assert 1 <= _components(sample.mask) <= len(sample.kinds), (seed, sample.kinds)
        kinds.update(sample.kinds)
        counts.add(len(sample.kinds))
    assert kinds == set(SHAPE_KINDS)
    assert counts == {1, 2, 3}


def test_random_mask_is_a_function_of_the_generator():
    a = random_mask(48, 64, torch.Generator().manual_seed(7))
    b = random_mask(48, 64, torch.Generator().manual_seed(7))
    c = random_mask(48, 64, torch.Generator().manual_seed(8))
    assert torch.equal(a.mask, b.mask) and a.kinds == b.kinds
    assert not torch.equal(a.mask, c.mask)
    batch = training_masks(48, 64, [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    assert batch.shape == (2, 1, 48, 64)
    assert torch.equal(batch[0, 0], a.mask) and torch.equal(batch[1, 0], c.mask)


def test_random_mask_rejects_a_bad_range():
    with pytest.raises(ValueError, match="low <= high"):
        random_mask(32, 32, torch.Generator(), (0.5, 0.2))


def test_object_masks_hold_their_whole_object():
    """Around each object of 60 shapes images: a rectangle holds the square of half-side 1.1 r round the anchor
    (every shape lies in it), an ellipse the disc of radius 1.45 r (the same); in one-object images the mask holds
    every pixel that differs from the background; it is never over 60 % of the image."""
    data = ShapesDataset(60, image_size=64, seed=3)
    anchors = object_anchors(None, data)
    assert anchors[0] == tuple((p.x, p.y, p.r) for p in data.placements(0))
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    kinds, single = set(), 0
    for i, objects in enumerate(anchors):
        image, _, scene = data.example(i)
        for k, (x, y, r) in enumerate(objects):
            sample = object_mask(64, 64, (x, y, r), torch.Generator().manual_seed(100 * i + k))
            kinds.add(sample.kinds)
            dx, dy = (xs - x * 64) / (r * 64), (ys - y * 64) / (r * 64)
            hull = (dx**2 + dy**2 <= 1.45**2) if sample.kinds == ("ellipse",) else (dx.abs() <= 1.1) & (dy.abs() <= 1.1)
            assert bool(sample.mask[hull].all()), (i, k, sample.kinds)
            assert 0 < sample.coverage <= 0.6
            if len(objects) == 1:
                single += 1
                background = np.array(COLOURS[scene.background])
                drawn = torch.from_numpy((np.asarray(image) != background).any(-1))
                assert drawn.any() and bool(sample.mask[drawn].all()), i
    assert kinds == {("rectangle",), ("ellipse",)} and single >= 10


def test_training_masks_mix_object_and_random_masks():
    """object_fraction 0 draws exactly random_mask's masks; 1 only object masks (each holds one of its sample's
    anchors); 0.5 the object masks of 1 for about half the samples (the same draws) and random masks for the
    rest. A dataset that does not say where its objects are cannot give anchors."""
    anchors = [((0.25, 0.25, 0.1),), ((0.7, 0.6, 0.15), (0.3, 0.3, 0.08))] * 20
    generators = lambda: [torch.Generator().manual_seed(s) for s in range(40)]  # noqa: E731
    plain = torch.stack([random_mask(64, 64, g, COVERAGE).mask for g in generators()])[:, None]
    assert torch.equal(training_masks(64, 64, generators(), COVERAGE, anchors, 0.0), plain)
    only = training_masks(64, 64, generators(), COVERAGE, anchors, 1.0)
    for mask, objects in zip(only[:, 0], anchors):
        assert any(mask[int(y * 64), int(x * 64)] == 1 for x, y, _ in objects)
    mixed = training_masks(64, 64, generators(), COVERAGE, anchors, 0.5)
    from_objects = sum(torch.equal(m, o) for m, o in zip(mixed, only))
    assert 10 <= from_objects <= 30
    assert not any(torch.equal(m, p) for m, p in zip(mixed, plain))  # the choice is drawn first
    with pytest.raises(UsageError, match="placements"):
        object_anchors(None, [(torch.zeros(3, 8, 8), "a red circle")])


def test_object_masks_need_the_shapes_dataset(tmp_path):
    config = json.loads(Path("configs/small_inpainting.json").read_text())
    config["data"].update(dataset="folder", data_root=str(tmp_path), object_masks=0.5)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="object_masks needs dataset='shapes'"):
        load_config(path)
    config["data"].update(dataset="shapes", object_masks=1.5)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"object_masks must be in \[0, 1\]"):
        load_config(path)


def test_glide_init_reproduces_the_base_model_whatever_the_extra_channels():
    """Zero weights on the 5 new input channels: the 9-channel model's ε equals the base model's for any
    extra input (only the conv's summation order differs: 1e-5)."""
    base = randomize_(UNet(UNET), seed=3).eval()
    inpaint = UNet(type(UNET).from_dict({**UNET.to_dict(), "num_channels": 9})).eval()
    inpaint.load_state_dict(glide_init_state(base.state_dict(), 9), strict=True)
    assert torch.equal(inpaint.in_layer.weight[:, :4], base.in_layer.weight)
    assert not inpaint.in_layer.weight[:, 4:].any()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, UNET.context_dim, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([3, 800])
    with torch.no_grad():
        expected = base(x, t, context, mask)
        for scale in (0.0, 1.0, 100.0):
            extra = scale * torch.randn(2, 5, 8, 8, generator=generator)
            got = inpaint(torch.cat([x, extra], dim=1), t, context, mask)
            assert torch.allclose(got, expected, atol=1e-5), (scale, (got - expected).abs().max())


def test_load_init_unet_expands_a_base_folder_and_rejects_other_architectures(tmp_path):
    from safetensors.torch import save_file

    base = randomize_(UNet(UNET), seed=5)
    (tmp_path / "config.json").write_text(json.dumps(UNET.to_dict()))
    save_file(base.state_dict(), str(tmp_path / "model.safetensors"))
    target = type(UNET).from_dict({**UNET.to_dict(), "num_channels": 9})
    state = load_init_unet(tmp_path, target)
    assert state["in_layer.weight"].shape[1] == 9
    UNet(target).load_state_dict(state, strict=True)
    wider = type(UNET).from_dict({**UNET.to_dict(), "model_channels": 32})
    with pytest.raises(ValueError, match="model_channels"):
        load_init_unet(tmp_path, wider)


def test_init_unet_may_be_any_model_folder(tmp_path):
    """init_unet goes through the checkpoint reader: a native model folder (here the bundled small model, stored
    in fp16) gives its U-Net's tensors, expanded to the inpainting input."""
    from kandinsky3.weights.loading import load_unet

    bundled = Path(__file__).resolve().parents[2] / "kandinsky3" / "assets" / "tiny" / "base"
    base = load_unet(bundled)
    target = type(base.config).from_dict({**base.config.to_dict(), "num_channels": 9})
    state = load_init_unet(bundled, target)
    inpaint = UNet(target)
    inpaint.load_state_dict(state, strict=True)
    assert torch.equal(inpaint.in_layer.weight[:, :4], base.in_layer.weight.float())
    assert not inpaint.in_layer.weight[:, 4:].any()
    expanded = inpaint.state_dict()
    assert all(torch.equal(expanded[key], value.float()) for key, value in base.state_dict().items()
               if key != "in_layer.weight")
