"""Training losses: the edge term of the MoVQ trainer, by hand-computed values and through a run."""

from __future__ import annotations

import csv

import pytest
import torch
from _tiny_training import movq_config, one_thread

from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.models.movq import MoVQConfig
from kandinsky3.training.checkpoint import CHECKPOINT, load_checkpoint
from kandinsky3.training.losses import edge_loss
from kandinsky3.training.train_movq import train_movq

_single_thread = pytest.fixture(autouse=True)(one_thread)

TINY_MOVQ = MoVQConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32, norm_groups=4,
                       codebook_size=32)


def test_edge_loss_by_hand():
    """A step edge [0, 0, 1, 1] reconstructed as the ramp [0, 0.5, 0.5, 1]: the error [0, .5, -.5, 0] has
    horizontal neighbour differences (.5, -1, .5), mean |·| 2/3; the two identical rows add vertical differences
    of 0, so the term is (2/3 + 0) / 2."""
    target = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)[None, None]
    ramp = torch.tensor([[0.0, 0.5, 0.5, 1.0]] * 2)[None, None]
    assert edge_loss(ramp, target).item() == pytest.approx(1 / 3, abs=1e-7)
    assert edge_loss(target.transpose(-1, -2), ramp.transpose(-1, -2)).item() == pytest.approx(1 / 3, abs=1e-7)


def test_edge_loss_ignores_a_uniform_shift_and_has_gradients():
    """A constant offset is a pixel error with no edge error; a blur is the opposite case the term exists for."""
    images = torch.zeros(2, 3, 16, 16)
    images[..., 4:12, 4:12] = 1.0
    assert edge_loss(images + 0.3, images).item() < 1e-7  # float rounding of 1.3 − 1 only
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    blurred.requires_grad_(True)
    loss = edge_loss(blurred, images)
    assert loss.item() > 0.01
    loss.backward()
    assert blurred.grad is not None and blurred.grad.abs().sum() > 0


def test_a_movq_run_with_the_edge_term_logs_it_and_trains_differently(tmp_path):
    """loss.edge_weight > 0 adds the term to the objective (other weights than the same run without it) and logs
    it; the default 0 leaves the column empty."""
    runs = {}
    for name, weight in (("plain", 0.0), ("edge", 1.0)):
        out = tmp_path / name
        train_movq(movq_config(out, TINY_MOVQ, "disc.start=-1", f"loss.edge_weight={weight}"),
                   dataset=ShapesDataset(8, image_size=32, seed=3))
        rows = list(csv.DictReader((out / "log.csv").open()))
        runs[name] = (load_checkpoint(out / CHECKPOINT)["model"], rows)
    assert all(row["edge"] == "" for row in runs["plain"][1])
    assert runs["edge"][1] and all(float(row["edge"]) > 0 for row in runs["edge"][1])
    weight = "decoder.conv_out.weight"
    assert not torch.equal(runs["plain"][0][weight], runs["edge"][0][weight])


def test_a_negative_loss_weight_is_refused(tmp_path):
    with pytest.raises(ValueError, match="edge_weight must be >= 0, got -1.0"):
        movq_config(tmp_path, TINY_MOVQ, "loss.edge_weight=-1")
