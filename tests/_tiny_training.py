"""Tiny run configs for the trainer tests: 32×32 shapes images, a 3-level MoVQ (8×8 latents), a
2-level U-Net, a 2-layer T5 trained from scratch with a tokenizer trained on the captions.

Configs are built the way the command line builds them: a complete JSON dict, ``section.key=value``
overrides, one strict parse."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers.models.t5.modeling_t5  # noqa: F401  (imported before forked ranks start: saves seconds each)

from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.models.movq import MoVQ, MoVQConfig
from kandinsky3.models.unet import UNetConfig
from kandinsky3.training.config import (MoVQTrainConfig, TextTrainConfig, UNetTrainConfig, apply_overrides,
                                       parse_config)
from kandinsky3.weights.native import write_native

MOVQ = MoVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32, norm_groups=4)
UNET = UNetConfig(model_channels=16, init_channels=8, num_channels=4, out_channels=4, time_embed_dim=16,
                  context_dim=16, groups=4, head_dim=8, dim_mult=(1, 2), num_blocks=(1, 1))
T5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-silu",
          dropout_rate=0.0, tie_word_embeddings=False)


def _run(out_dir: Path) -> dict:
    return dict(out_dir=str(out_dir), seed=0, device="cpu", precision="fp32", num_threads=0, fsdp=False,
                log_interval=1, sample_interval=0, checkpoint_interval=0)


def _data() -> dict:
    return dict(dataset="shapes", data_root="", num_samples=16, data_seed=5, image_size=32)


def unet_config(out_dir: Path, movq_path: Path, *overrides: str) -> UNetTrainConfig:
    """A tiny base U-Net run (4 steps of 4 samples in 2 micro-batches) with ``section.key=value`` overrides."""
    data = {
        "trainer": "unet",
        "run": _run(out_dir),
        "data": {**_data(), "resolution_buckets": [], "cache_latents": True, "latent_cache": "",
                 "mask_coverage": [0.05, 0.6]},
        "model": {"mode": "base", "unet": UNET.to_dict(), "movq_path": str(movq_path), "init_unet": ""},
        "text": {"encoder_path": "", "t5_config": T5, "tokenizer_dir": "", "tokenizer_vocab_size": 128,
                 "max_length": 128, "train_t5": True, "cfg_dropout": 0.1},
        "optim": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "warmup_steps": 2},
        "ema": {"decay": 0.9},
        "samples": {"prompts": ["a red circle", "a blue square on a yellow background"], "steps": 3,
                    "guidance": 3.0, "sampler": "original"},
    }
    return parse_config(apply_overrides(data, overrides))


def movq_config(out_dir: Path, model: MoVQConfig, *overrides: str) -> MoVQTrainConfig:
    """A tiny MoVQ run (4 steps of 4 images in 2 micro-batches, discriminator from step 1) with overrides."""
    data = {
        "trainer": "movq",
        "run": _run(out_dir),
        "data": _data(),
        "model": model.to_dict(),
        "loss": {"l1_weight": 1.0, "mse_weight": 1.0, "codebook_weight": 1.0},
        "disc": {"start": 1, "weight": 0.1, "adaptive": True, "lr": 0.0, "channels": 8, "layers": 2},
        "optim": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "warmup_steps": 2},
        "ema": {"decay": 0.9},
    }
    return parse_config(apply_overrides(data, overrides))


def text_config(out_dir: Path, *overrides: str) -> TextTrainConfig:
    """A tiny text pretraining run (4 steps of 8 captions) with ``section.key=value`` overrides."""
    data = {
        "trainer": "text",
        "run": _run(out_dir),
        "data": _data(),
        "text": {"t5_config": T5, "tokenizer_dir": "", "tokenizer_vocab_size": 128,
                 "max_length": 128},
        "optim": {"name": "adamw", "lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"max_steps": 4, "batch_size": 8, "grad_accum": 1, "warmup_steps": 0},
        "ema": {"decay": 0.0},
    }
    return parse_config(apply_overrides(data, overrides))


def dataset(num_samples: int = 16) -> ShapesDataset:
    return ShapesDataset(num_samples, image_size=32, seed=5)


def movq_dir(folder: Path, seed: int = 0) -> Path:
    """A random (untrained) tiny MoVQ in a model folder, as a MoVQ run exports it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        movq = MoVQ(MOVQ)
    return write_native(folder, movq=movq)


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
