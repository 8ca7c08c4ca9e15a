"""What a U-Net run starts from: its text encoder and its U-Net, before any checkpoint is loaded.

- Text encoder: pretrained (``text.encoder_path``: a plain T5 folder such as Flan-UL2's encoder, or
  the text encoder of any model the project's checkpoint reader opens, e.g. the bundled
  ``kandinsky3/assets/tiny/base`` or a previous run's ``final/``, whose conditioning tensors add the
  trained projection and null embedding), or a fresh T5 from ``text.t5_config`` with a tokenizer
  trained on the dataset captions (:mod:`.caption_tokenizer`).
- U-Net: fresh weights, or ``model.init_unet``, read by the project's checkpoint reader (any model
  folder, Hub repo id or U-Net file); a base (4-channel) U-Net loaded into an inpainting (9-channel)
  run is expanded GLIDE-style (:func:`glide_init_state`, practice §8).

Whatever dtype a pretrained model is stored in (the bundled one is fp16), the run starts from fp32
copies of its weights; ``run.precision`` decides the compute dtype.

Fresh weights are drawn from the global RNG seeded with ``run.seed`` inside a forked RNG state, so
every rank starts from the same weights and the caller's RNG is untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..models.text_encoder import TextEncoder
from ..models.unet import UNet, UNetConfig
from ..weights.build import resolve_config
from ..weights.loading import component_source
from ..weights.native import CONDITIONING_FILE
from ..weights.sources import TextSource
from ..weights.t5 import load_t5, load_t5_tokenizer
from .caption_tokenizer import train_caption_tokenizer
from .config import UNetTrainConfig
from .distributed import barrier

logger = logging.getLogger(__name__)

__all__ = ["initial_models", "text_encoder_for_run", "run_tokenizer", "fresh_t5_config", "pretrained_text",
           "glide_init_state", "load_init_unet"]


def initial_models(config: UNetTrainConfig, captions: list[str], out_dir: Path,
                   is_main: bool) -> tuple[UNet, TextEncoder]:
    """The run's U-Net and text encoder on the CPU, identical on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        text_encoder = text_encoder_for_run(config, captions, out_dir, is_main)
        unet = UNet(config.model.unet)
    if config.model.init_unet:
        unet.load_state_dict(load_init_unet(config.model.init_unet, config.model.unet), strict=True)
    return unet, text_encoder


def text_encoder_for_run(config: UNetTrainConfig, captions: list[str], out_dir: Path, is_main: bool) -> TextEncoder:
    """The run's :class:`TextEncoder` on the CPU (fresh weights drawn from the global RNG: seed it first).

    Pretrained (``text.encoder_path``, see :func:`pretrained_text`): T5 (in fp32) + tokenizer, and the projection
    and null embedding of a model's text encoder when it has them (else fresh ones, drawn from the global RNG).
    Fresh (``text.t5_config``): the tokenizer from ``text.tokenizer_dir`` (default ``out_dir/tokenizer``), trained
    on ``captions`` by rank 0 when the folder has none, and a new T5 whose vocabulary size is the tokenizer's.
    """
    from transformers import T5EncoderModel

    text = config.text
    conditioning: dict[str, torch.Tensor] = {}
    if text.encoder_path:
        source = pretrained_text(Path(text.encoder_path))
        t5 = load_t5(source.t5_folder, variant=source.t5_variant, dtype=torch.float32)
        tokenizer = load_t5_tokenizer(source.tokenizer_folder)
        conditioning = source.conditioning
    else:
        tokenizer = run_tokenizer(text.tokenizer_dir, text.tokenizer_vocab_size, lambda: captions, out_dir, is_main)
        t5 = T5EncoderModel(fresh_t5_config(text.t5_config, tokenizer))
    encoder = TextEncoder(t5, tokenizer, context_dim=config.model.unet.context_dim, max_length=text.max_length,
                          freeze_t5=not text.train_t5)
    if conditioning:
        encoder.load_projection({k[len("projection."):]: v.float() for k, v in conditioning.items()
                                 if k.startswith("projection.")})
        if "null_embedding" in conditioning:
            encoder.load_null_embedding(conditioning["null_embedding"].float().reshape(-1))
        logger.info("text projection%s from %s", " and null embedding" if "null_embedding" in conditioning else "",
                    text.encoder_path)
    return encoder


def run_tokenizer(tokenizer_dir: str, vocab_size: int, captions: Callable[[], list[str]], out_dir: Path,
                  is_main: bool):
    """The tokenizer of a fresh T5: read from ``tokenizer_dir`` (default ``out_dir/tokenizer``), trained on
    ``captions()`` (called only then) and saved there first by rank 0 when the folder holds none."""
    folder = Path(tokenizer_dir) if tokenizer_dir else out_dir / "tokenizer"
    if is_main and not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        train_caption_tokenizer(captions(), vocab_size).save_pretrained(str(folder))
    barrier()
    return load_t5_tokenizer(folder)


def fresh_t5_config(fields: dict, tokenizer):
    """``T5Config`` of a fresh T5 from a run's ``t5_config`` fields with the tokenizer's vocabulary size (unless
    given, and then at least that) and the Flan-UL2 special ids (pad 0, EOS 1)."""
    from transformers import T5Config

    fields = dict(fields)
    if fields.setdefault("vocab_size", len(tokenizer)) < len(tokenizer):
        raise ValueError(f"text.t5_config.vocab_size {fields['vocab_size']} < tokenizer size {len(tokenizer)}")
    fields.update(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5Config(**fields)


def pretrained_text(path: Path) -> TextSource:
    """What ``text.encoder_path`` names: a plain T5 folder (``config.json``, weights, tokenizer; no projection), or
    the text encoder of any model the checkpoint reader opens (a model folder such as ``kandinsky3/assets/tiny/base``
    or a run's ``final/``, its ``text_encoder/``, a diffusers or original folder, a Hub repo id)."""
    if (path / "config.json").is_file() and not (path / CONDITIONING_FILE).is_file():
        return TextSource(path, path, {})
    return component_source(path, "text_encoder")


def glide_init_state(base: dict[str, torch.Tensor], num_channels: int) -> dict[str, torch.Tensor]:
    """A base U-Net state dict expanded to ``num_channels`` inputs, GLIDE-style (practice §8).

    Every tensor is copied; ``in_layer.weight`` (C,4,3,3) becomes (C,num_channels,3,3) with the
    base kernel in input channels 0-3 and zeros for the new ones, so the expanded network gives
    exactly the base network's output whatever the extra channels hold.
    """
    weight = base["in_layer.weight"]
    if weight.shape[1] > num_channels:
        raise ValueError(f"cannot shrink in_layer from {weight.shape[1]} to {num_channels} input channels")
    expanded = weight.new_zeros(weight.shape[0], num_channels, *weight.shape[2:])
    expanded[:, : weight.shape[1]] = weight
    return {**base, "in_layer.weight": expanded}


def load_init_unet(path: str | Path, target: UNetConfig) -> dict[str, torch.Tensor]:
    """State dict for ``target`` from the U-Net of ``path`` (any model folder, Hub repo id, U-Net folder or file).

    Its config must equal ``target`` except perhaps for ``num_channels``; a base model (4 channels)
    loaded into an inpainting config (9) is expanded by :func:`glide_init_state`.
    """
    source = component_source(path, "unet")
    config = resolve_config("unet", source, head_dim=target.head_dim, groups=target.groups)
    differ = sorted(k for k, v in config.to_dict().items() if k != "num_channels" and target.to_dict()[k] != v)
    if differ:
        raise ValueError(f"init_unet {path}: config differs from the run's model.unet in {differ}")
    state = {key: source.tensors[key] for key in source.tensors}
    if config.num_channels != target.num_channels:
        state = glide_init_state(state, target.num_channels)
        logger.info("GLIDE init from %s: in_layer %d -> %d input channels, new ones zero", path,
                    config.num_channels, target.num_channels)
    return state
