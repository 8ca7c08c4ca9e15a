"""What a U-Net run starts from: its text encoder and its U-Net, before any checkpoint is loaded.

- Text encoder: a pretrained folder (``text.encoder_path``: T5 and tokenizer, e.g. Flan-UL2's
  encoder; or a previous run's model folder, whose ``text_encoder/conditioning.safetensors`` adds the
  trained projection and null embedding), or a fresh T5 from ``text.t5_config`` with a tokenizer
  trained on the dataset captions (:mod:`.caption_tokenizer`).
- U-Net: fresh weights, or ``model.init_unet``, read by the project's checkpoint reader (any model
  folder, Hub repo id or U-Net file); a base (4-channel) U-Net loaded into an inpainting (9-channel)
  run is expanded GLIDE-style (:func:`glide_init_state`, architecture §8).

Fresh weights are drawn from the global RNG seeded with ``run.seed`` inside a forked RNG state, so
every rank starts from the same weights and the caller's RNG is untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.text_encoder import TextEncoder
from ..models.unet import UNet, UNetConfig
from ..weights.build import resolve_config
from ..weights.loading import component_source
from ..weights.native import CONDITIONING_FILE, is_native_folder
from ..weights.t5 import load_t5_tokenizer
from .caption_tokenizer import train_caption_tokenizer
from .config import UNetTrainConfig
from .distributed import barrier

logger = logging.getLogger(__name__)

__all__ = ["initial_models", "text_encoder_for_run", "glide_init_state", "load_init_unet"]


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

    Pretrained (``text.encoder_path``, a T5 folder or a model folder's ``text_encoder/``): T5 + tokenizer,
    and the projection and null embedding from ``conditioning.safetensors`` when present (else fresh ones,
    drawn from the global RNG). Fresh (``text.t5_config``): the tokenizer from ``text.tokenizer_dir``
    (default ``out_dir/tokenizer``), trained on ``captions`` by rank 0 when the folder has none, and a new
    T5 whose vocabulary size is the tokenizer's.
    """
    from transformers import T5Config, T5EncoderModel

    text = config.text
    conditioning = None
    if text.encoder_path:
        folder = Path(text.encoder_path)
        folder = folder / "text_encoder" if is_native_folder(folder) else folder
        t5 = T5EncoderModel.from_pretrained(str(folder))
        tokenizer = load_t5_tokenizer(folder)
        conditioning = folder / CONDITIONING_FILE
    else:
        folder = Path(text.tokenizer_dir) if text.tokenizer_dir else out_dir / "tokenizer"
        if is_main and not (folder / "tokenizer_config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            train_caption_tokenizer(captions, text.tokenizer_vocab_size).save_pretrained(str(folder))
        barrier()
        tokenizer = load_t5_tokenizer(folder)
        fields = dict(text.t5_config)
        if fields.setdefault("vocab_size", len(tokenizer)) < len(tokenizer):
            raise ValueError(f"text.t5_config.vocab_size {fields['vocab_size']} < tokenizer size {len(tokenizer)}")
        fields.update(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        t5 = T5EncoderModel(T5Config(**fields))
    encoder = TextEncoder(t5, tokenizer, context_dim=config.model.unet.context_dim, max_length=text.max_length,
                          freeze_t5=not text.train_t5)
    if conditioning is not None and conditioning.is_file():
        tensors = load_file(str(conditioning))
        encoder.load_projection({k[len("projection."):]: v for k, v in tensors.items() if k.startswith("projection.")})
        if "null_embedding" in tensors:
            encoder.load_null_embedding(tensors["null_embedding"].reshape(-1))
        logger.info("text projection and null embedding from %s", conditioning)
    return encoder


def glide_init_state(base: dict[str, torch.Tensor], num_channels: int) -> dict[str, torch.Tensor]:
    """A base U-Net state dict expanded to ``num_channels`` inputs, GLIDE-style (architecture §8).

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
