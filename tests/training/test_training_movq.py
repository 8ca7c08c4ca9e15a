"""MoVQ trainer: exact stop-and-resume, latent rescaling, export round trip, loss falls, decoder fine-tune.

Tiny MoVQ (widths 8/16, 32×32 shapes images) so every run takes seconds on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_training import max_difference, movq_config, one_thread

from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.models.movq import MoVQ, MoVQConfig
from kandinsky3.training.checkpoint import CHECKPOINT, load_checkpoint
from kandinsky3.training.train_movq import rescale_latents_, train_movq
from kandinsky3.weights.loading import load_components, load_movq

_single_thread = pytest.fixture(autouse=True)(one_thread)

TINY_MOVQ = MoVQConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                       norm_groups=4, codebook_size=32, codebook_ema=True, codebook_restart_after=2)


def _dataset() -> ShapesDataset:
    return ShapesDataset(12, image_size=32, seed=3)


def test_movq_resume_continues_exactly(tmp_path):
    """2 steps, checkpoint, fresh objects, 2 more steps == 4 uninterrupted steps (model, EMA, optimizers,
    codebook statistics, discriminator). All CPU kernels are deterministic, so the match is exact;
    1e-6 is the stated bound."""
    train_movq(movq_config(tmp_path / "straight", TINY_MOVQ), dataset=_dataset())
    train_movq(movq_config(tmp_path / "split", TINY_MOVQ, "schedule.max_steps=2"), dataset=_dataset())
    torch.manual_seed(1234)  # the global RNG must not matter
    train_movq(movq_config(tmp_path / "split", TINY_MOVQ), resume=True, dataset=_dataset())
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT)
    assert a["step"] == b["step"] == 4
    assert set(a["extra"]) == {"disc", "disc_optimizer", "disc_scaler"}  # the discriminator was on (disc.start=1)
    worst, where = max_difference({k: a[k] for k in ("model", "ema", "optimizer", "extra")},
                                  {k: b[k] for k in ("model", "ema", "optimizer", "extra")})
    assert worst <= 1e-6, (where, worst)
    # the run changed the weights at all
    fresh = MoVQ(TINY_MOVQ).state_dict()
    assert not torch.equal(fresh["decoder.conv_out.weight"], a["model"]["decoder.conv_out.weight"])


def test_the_trainer_holds_the_movq_channels_last(tmp_path):
    """The trainer keeps the MoVQ channels-last (a training step runs 1.15-1.5x faster on this CPU): the weights
    it trains and saves are stored that way, and the checkpoint keeps the layout, so a resumed run has it too."""
    train_movq(movq_config(tmp_path, TINY_MOVQ, "schedule.max_steps=1", "disc.start=-1"), dataset=_dataset())
    weights = load_checkpoint(tmp_path / CHECKPOINT)["model"]
    for key in ("encoder.conv_in.weight", "decoder.conv_out.weight"):
        assert weights[key].is_contiguous(memory_format=torch.channels_last), key
        assert not weights[key].is_contiguous(), key  # 3x3 kernels: the two layouts differ


def test_rescale_latents_keeps_reconstructions(tmp_path):
    """Folding a latent scale into quant_conv / post_quant_conv / SpatialNorm convs / codebook changes the
    latents by exactly that factor and nothing else (fp32 reassociation only: 1e-5)."""
    generator = torch.Generator().manual_seed(0)
    movq = MoVQ(TINY_MOVQ).eval()
    with torch.no_grad():
        for p in movq.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    images = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        latents = movq.encode(images)
        decoded = movq.decode(latents)
        quantized_rec, _, info = movq(images)
        rescale_latents_(movq, 0.37)
        assert torch.allclose(movq.encode(images), 0.37 * latents, atol=1e-6)
        assert torch.allclose(movq.decode(0.37 * latents), decoded, atol=1e-5)
        quantized_rec2, _, info2 = movq(images)
    assert torch.equal(info["indices"], info2["indices"])
    assert torch.allclose(quantized_rec2, quantized_rec, atol=1e-5)


def test_movq_export_loads_and_loss_falls(tmp_path):
    """The export is a model folder holding the MoVQ alone (training size as its sampling default) that the
    project loader reads; reconstruction loss falls over a short run; the sample grid is written."""
    config = movq_config(tmp_path, TINY_MOVQ, "schedule.max_steps=30", "disc.start=-1", "schedule.grad_accum=1",
                         "run.log_interval=5", "run.sample_interval=30")
    train_movq(config, dataset=_dataset())
    assert (tmp_path / "samples" / "step_000030.png").is_file()
    rows = (tmp_path / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    l1 = [float(r.split(",")[header.index("l1")]) for r in rows[1:]]
    assert l1[-1] < 0.6 * l1[0], l1  # measured: about 0.34x after 30 steps
    components = load_components(tmp_path / "final", components=("movq",))
    movq = components.movq
    assert movq.config == TINY_MOVQ and (components.sampling_defaults.width, components.sampling_defaults.height) == (
        32, 32)
    images = torch.stack([_dataset()[i][0] for i in range(4)])
    with torch.no_grad():
        latents = movq.encode(images)
    assert latents.abs().flatten().quantile(0.995) < 1.5  # export normalised the latent range to about 1


def _unquantised_error(movq: MoVQ, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float((movq.decode(movq.encode(images)) - images).abs().mean())


def test_decoder_finetune_keeps_the_latent_space(tmp_path):
    """A decoder fine-tune starts from an exported MoVQ, leaves the encoder, quant_conv and codebook bit-identical
    (the latents, and so the U-Nets trained on them, do not change: no rescaling at export), trains the decoder
    on the unquantised path the pipelines decode, and lowers that path's reconstruction error."""
    start = tmp_path / "start"
    train_movq(movq_config(start, TINY_MOVQ, "schedule.max_steps=10", "disc.start=-1"), dataset=_dataset())
    run = tmp_path / "decoder"
    train_movq(movq_config(run, TINY_MOVQ, "schedule.max_steps=20", "disc.start=-1", "ema.decay=0",
                           f"decoder.finetune_from={start / 'final'}"), dataset=_dataset())
    before, after = load_movq(start / "final"), load_movq(run / "final")
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)
    assert not torch.equal(old["decoder.conv_out.weight"], new["decoder.conv_out.weight"])
    images = torch.stack([_dataset()[i][0] for i in range(12)])
    with torch.no_grad():
        assert torch.equal(before.encode(images), after.encode(images))
    assert _unquantised_error(after, images) < 0.9 * _unquantised_error(before, images)


def test_decoder_finetune_refuses_another_architecture(tmp_path):
    """The starting MoVQ must be the run's model: a mismatch is named before any step runs."""
    start = tmp_path / "start"
    train_movq(movq_config(start, TINY_MOVQ, "schedule.max_steps=1", "disc.start=-1"), dataset=_dataset())
    config = movq_config(tmp_path / "run", TINY_MOVQ, "model.ch=16", f"decoder.finetune_from={start / 'final'}")
    with pytest.raises(ValueError, match="decoder.finetune_from"):
        train_movq(config, dataset=_dataset())
    assert not (tmp_path / "run").exists()  # refused before the run folder was written
