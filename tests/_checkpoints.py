"""Tiny random checkpoints in every Kandinsky 3 layout, for fast CPU tests (nothing is downloaded).

Writers (each returns a :class:`Written` with the folder and the reference networks it holds):

- ``write_original(root, generation="3.1", variants=("base",))``: ai-forever layout. 3.1: ``weights/kandinsky3*.pt``
  ``{unet, null_embedding}``, ``weights/movq.pt``, ``weights/flan_ul2_encoder/`` with T5 ``.bin`` shards + index,
  tokenizer files and ``projection*.pt``. 3.0: ``{unet, null_embedding, projections}`` and a separate full
  encoder-decoder T5 folder ``flan-ul2/`` (pass it as ``t5_path``).
- ``write_diffusers(root)``: a diffusers pipeline folder saved by diffusers' own ``Kandinsky3UNet`` / ``VQModel`` /
  ``DDPMScheduler`` ``save_pretrained`` and transformers' ``T5EncoderModel.save_pretrained`` (fp16 variant files
  optional), plus ``model_index.json``.
- ``write_native(root)``: the native layout via ``kandinsky3.weights.write_native``.

Every parameter is random (also norm weights and zero-initialised projections) and drawn from explicit generators,
so the files are identical across runs. The U-Net, MoVQ and T5 are the smallest shapes that exercise every code
path: 2 U-Net levels (asymmetric attention flags, docs/practice.md §10.2), MoVQ attention at level 1, a 2-layer
T5.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch
from _tiny_models import randomize_near_identity_ as randomize_
from _tiny_text import TINY_CORPUS, tiny_t5_config, tiny_t5_encoder, tiny_text_encoder, tiny_tokenizer

from kandinsky3.models.movq import MoVQ, MoVQConfig
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.models.unet import UNet, UNetConfig

__all__ = [
    "T5_DIM",
    "CONTEXT_DIM",
    "TINY_UNET",
    "TINY_MOVQ",
    "DIFFUSERS_UNET",
    "Written",
    "randomize_",
    "make_unet",
    "make_movq",
    "make_text_encoder",
    "write_original",
    "write_diffusers",
    "write_native",
    "unet_inputs",
    "max_diff",
    "assert_unet_matches",
    "assert_movq_matches",
    "assert_text_matches",
]

T5_DIM = 32  # d_model of the tiny T5
CONTEXT_DIM = 12  # projected context width = U-Net context_dim
_SUFFIX = {"base": "", "flash": "_flash", "inpainting": "_inpainting"}

TINY_UNET = UNetConfig(
    model_channels=16, init_channels=8, num_channels=4, out_channels=4, time_embed_dim=16, context_dim=CONTEXT_DIM,
    groups=4, head_dim=4, dim_mult=(1, 2), num_blocks=(2, 2, 2, 2),
)
# The same network as diffusers builds it (init_channels = block_out_channels[0] // 2, 4-entry flags).
DIFFUSERS_UNET = dict(
    in_channels=4, time_embedding_dim=16, groups=4, attention_head_dim=4, layers_per_block=2,
    block_out_channels=(16, 32), cross_attention_dim=CONTEXT_DIM, encoder_hid_dim=T5_DIM,
)
TINY_MOVQ = MoVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), resolution=256, z_channels=4)


@dataclass
class Written:
    """A checkpoint folder and the reference networks written into it (``unets``/``texts`` keyed by variant)."""

    root: Path
    unets: dict[str, UNet] = field(default_factory=dict)
    movq: MoVQ | None = None
    texts: dict[str, TextEncoder] = field(default_factory=dict)
    t5_path: Path | None = None
    diffusers_unet: object = None
    diffusers_movq: object = None


def make_unet(config: UNetConfig = TINY_UNET, seed: int = 0) -> UNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return randomize_(UNet(config), seed)


def make_movq(config: MoVQConfig = TINY_MOVQ, seed: int = 0) -> MoVQ:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return randomize_(MoVQ(config), seed)


def make_text_encoder(seed: int = 0, t5_seed: int = 0) -> TextEncoder:
    """Tiny T5 (``t5_seed``) with a random projection and null embedding (``seed``)."""
    encoder = tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=T5_DIM, seed=t5_seed)
    randomize_(encoder.projection, seed)
    with torch.no_grad():
        encoder.null_embedding.copy_(torch.randn(CONTEXT_DIM, generator=torch.Generator().manual_seed(seed)))
    return encoder


@functools.lru_cache(maxsize=1)
def _spiece_model() -> bytes:
    """The tiny tokenizer's vocabulary as a sentencepiece ``spiece.model`` (same training as ``_tiny_text``)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 4), model_writer=model, model_type="unigram", vocab_size=160,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    return model.getvalue()


def _write_hub_style_tokenizer(folder: Path) -> None:
    """``spiece.model`` + ``tokenizer_config.json``, like the 3.1 ``flan_ul2_encoder/`` (no tokenizer.json)."""
    (folder / "spiece.model").write_bytes(_spiece_model())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))


def _save_bin_shards(model: torch.nn.Module, folder: Path, shards: int = 2) -> None:
    """transformers' legacy sharded layout: ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``."""
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    keys = list(state)
    weight_map = {}
    for index in range(shards):
        name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = keys[index::shards]
        torch.save({k: state[k].clone() for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(str(folder))


def write_original(
    root: Path, generation: str = "3.1", variants: tuple[str, ...] = ("base",), seed: int = 0
) -> Written:
    """An ai-forever checkpoint folder (see module docstring); U-Net, projection and null embedding per variant."""
    weights = root / "weights"
    weights.mkdir(parents=True)
    written = Written(root, movq=make_movq(seed=seed))
    torch.save(written.movq.state_dict(), weights / "movq.pt")
    encoder_folder = weights / "flan_ul2_encoder"
    t5 = tiny_t5_encoder(T5_DIM, seed)
    if generation == "3.1":
        encoder_folder.mkdir()
        _save_bin_shards(t5, encoder_folder)
        _write_hub_style_tokenizer(encoder_folder)
    else:
        from transformers import T5ForConditionalGeneration

        written.t5_path = root / "flan-ul2"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = T5ForConditionalGeneration(tiny_t5_config(T5_DIM))
        full.encoder.load_state_dict(t5.encoder.state_dict())
        full.shared.load_state_dict(t5.shared.state_dict())
        full.save_pretrained(str(written.t5_path))
        tiny_tokenizer().save_pretrained(str(written.t5_path))
    for offset, variant in enumerate(variants):
        config = TINY_UNET if variant != "inpainting" else UNetConfig(**{**TINY_UNET.to_dict(), "num_channels": 9})
        unet = make_unet(config, seed=seed + 10 + offset)
        text = make_text_encoder(seed=seed + 20 + offset, t5_seed=seed)
        container = {"unet": unet.state_dict(), "null_embedding": text.null_embedding.detach().clone()}
        projection = {k: v.clone() for k, v in text.projection.state_dict().items()}
        if generation == "3.0":
            container["projections"] = {f"t5.{k}": v for k, v in projection.items()}
        else:
            torch.save(projection, encoder_folder / f"projection{_SUFFIX[variant]}.pt")
        torch.save(container, weights / f"kandinsky3{_SUFFIX[variant]}.pt")
        written.unets[variant], written.texts[variant] = unet, text
    return written


def write_diffusers(root: Path, seed: int = 0, fp16_variant: bool = False) -> Written:
    """A diffusers pipeline folder; ``fp16_variant`` saves fp16 ``*.fp16.*`` files like the Hub repo does."""
    from diffusers import DDPMScheduler, Kandinsky3UNet, VQModel

    variant = "fp16" if fp16_variant else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = randomize_(Kandinsky3UNet(**DIFFUSERS_UNET), seed + 10)
        movq = randomize_(VQModel(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[32, 64],
            layers_per_block=1, latent_channels=4, norm_num_groups=32, norm_type="spatial", num_vq_embeddings=12,
            vq_embed_dim=4,
        ), seed + 30)
    text = tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=T5_DIM, seed=seed)
    if fp16_variant:
        unet, movq, text.t5 = unet.half(), movq.half(), text.t5.half()
    unet.save_pretrained(str(root / "unet"), variant=variant)
    movq.save_pretrained(str(root / "movq"), variant=variant)
    text.t5.save_pretrained(str(root / "text_encoder"), variant=variant)
    text.tokenizer.save_pretrained(str(root / "tokenizer"))
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", steps_offset=1, clip_sample=True)
    scheduler.save_pretrained(str(root / "scheduler"))
    index = {
        "_class_name": "Kandinsky3Pipeline", "_diffusers_version": "0.42.1",
        "movq": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "unet": ["diffusers", "Kandinsky3UNet"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return Written(root, diffusers_unet=unet.float(), diffusers_movq=movq.float(), texts={"base": text})


def write_native(root: Path, seed: int = 0, conditioning: str = "original", dtype=None) -> Written:
    """A native folder written by ``kandinsky3.weights.write_native`` from freshly made random networks."""
    from kandinsky3 import weights

    unet, movq, text = make_unet(seed=seed + 10), make_movq(seed=seed), make_text_encoder(seed=seed + 20, t5_seed=seed)
    weights.write_native(root, unet=unet, movq=movq, text_encoder=text, conditioning=conditioning, dtype=dtype)
    return Written(root, unets={"base": unet}, movq=movq, texts={"base": text})


def unet_inputs(config: UNetConfig, batch: int = 2, side: int = 8, length: int = 5, seed: int = 1):
    """Random (x, t, context, mask) for a U-Net of ``config``; sample 0 has a single real token."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.num_channels, side, side, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, length, config.context_dim, generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = 1
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (B,L) right-padded, True = real token
    return x, t, context, mask


# ------------------------------------------------------------------------------------------ comparisons

PROMPTS = ["a cat", "a small wooden house in a snowy forest"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def assert_unet_matches(loaded, reference, tolerance=1e-6):
    x, t, context, mask = unet_inputs(reference.config)
    assert max_diff(loaded(x, t, context, mask), reference(x, t, context, mask)) <= tolerance


@torch.no_grad()
def assert_movq_matches(loaded, reference, tolerance=1e-6):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latents = reference.encode(images)
    assert max_diff(loaded.encode(images), latents) <= tolerance
    assert max_diff(loaded.decode(latents), reference.decode(latents)) <= tolerance


@torch.no_grad()
def assert_text_matches(loaded, reference, tolerance=1e-6):
    context, mask = loaded.encode(PROMPTS)
    ref_context, ref_mask = reference.encode(PROMPTS)
    assert torch.equal(mask, ref_mask) and max_diff(context, ref_context) <= tolerance
    assert max_diff(loaded.null_embedding, reference.null_embedding) <= tolerance
