"""Tiny run configs for the trainer tests: 32×32 shapes images, a 3-level MoVQ (8×8 latents), a
2-level U-Net, a 2-layer T5 trained from scratch with a tokenizer trained on the captions."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers.models.t5.modeling_t5  # noqa: F401  (imported before forked ranks start: saves seconds each)

from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.models.movq import MoVQ, MoVQConfig
from kandinsky3.models.unet import UNetConfig
from kandinsky3.training.config import UNetRunConfig
from kandinsky3.training.train_movq import save_movq

MOVQ = MoVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32, norm_groups=4)
UNET = UNetConfig(model_channels=16, init_channels=8, num_channels=4, out_channels=4, time_embed_dim=16,
                  context_dim=16, groups=4, head_dim=8, dim_mult=(1, 2), num_blocks=(1, 1))
T5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-silu",
          dropout_rate=0.0, tie_word_embeddings=False)


def dataset(num_samples: int = 16) -> ShapesDataset:
    return ShapesDataset(num_samples, image_size=32, seed=5)


def movq_dir(folder: Path, seed: int = 0) -> Path:
    """A random (untrained) tiny MoVQ saved the way a MoVQ run saves it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        movq = MoVQ(MOVQ)
    save_movq(movq, folder)
    return folder


def unet_config(out_dir: Path, movq_path: Path, **overrides) -> UNetRunConfig:
    fields = dict(
        out_dir=str(out_dir), unet=UNET.to_dict(), movq_path=str(movq_path), t5_config=T5, train_text_encoder=True,
        tokenizer_vocab_size=128, image_size=32, batch_size=4, grad_accum=2, max_steps=4, lr=1e-3, warmup_steps=2,
        ema_decay=0.9, log_interval=1, sample_interval=0, checkpoint_interval=0, device="cpu", sample_steps=3,
    )
    fields.update(overrides)
    return UNetRunConfig(**fields)


def flatten(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict, keyed by its path."""
    out = {}
    if isinstance(state, dict):
        for key, value in state.items():
            out.update(flatten(value, f"{prefix}{key}/"))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            out.update(flatten(value, f"{prefix}{i}/"))
    elif isinstance(state, torch.Tensor):
        out[prefix] = state
    return out


def max_difference(a: dict, b: dict) -> tuple[float, str]:
    """Largest absolute difference over the tensors of two nested dicts with the same keys."""
    flat_a, flat_b = flatten(a), flatten(b)
    assert flat_a.keys() == flat_b.keys(), sorted(set(flat_a) ^ set(flat_b))[:8]
    worst, where = 0.0, ""
    for key in flat_a:
        if flat_a[key].numel():
            diff = (flat_a[key].double() - flat_b[key].double()).abs().max().item()
            if diff > worst:
                worst, where = diff, key
    return worst, where


def one_thread():
    """Fixture body: run a test on one thread (the shared CPU makes 2 threads several times slower) and
    restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
