"""Smoke run of the whole text-to-image pipeline on tiny random weights, offline.

    python -m kandinsky3.smoke -o smoke.png

Builds a 2-layer T5 encoder with a tiny tokenizer (a sentencepiece model
trained on a few sentences), a small U-Net and MoVQ with random weights, generates one image and
writes it.  The picture is noise-like by construction (nothing is trained); the run proves that
installation, text encoding, sampling and decoding work end to end on this machine.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch


def _tiny_tokenizer(folder: Path):
    """A T5 tokenizer from a sentencepiece model trained on a few sentences (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    corpus = [
        "a red circle on the left", "a small blue square", "a green triangle above a yellow circle",
        "a cute corgi lives in a house made out of sushi", "a large purple square on a white background",
    ] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return T5Tokenizer(vocab_file=str(path), extra_ids=0, legacy=False)


def build_tiny_pipeline(seed: int = 0):
    """A Kandinsky3Pipeline over tiny random components (U-Net and MoVQ at the released layout)."""
    from transformers import T5Config, T5EncoderModel

    from .models import MoVQ, MoVQConfig, TextEncoder, UNet, UNetConfig
    from .pipelines.text_to_image import Kandinsky3Pipeline

    torch.manual_seed(seed)  # entry point: seeds the random initialisation only
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = _tiny_tokenizer(Path(folder))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-silu", dropout_rate=0.0,
    )).eval()
    text_encoder = TextEncoder(t5, tokenizer, context_dim=32)
    unet = UNet(UNetConfig(
        model_channels=32, init_channels=16, time_embed_dim=64, context_dim=32, groups=8, head_dim=16,
        dim_mult=(1, 2, 4, 4), num_blocks=2,
    )).eval()
    movq = MoVQ(MoVQConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, resolution=64, norm_groups=8)).eval()
    return Kandinsky3Pipeline(unet, movq, text_encoder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="smoke.png", help="where to write the image (default: %(default)s)")
    parser.add_argument("--prompt", default="a red circle on the left", help="prompt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (default: %(default)s)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pipe = build_tiny_pipeline()
    image = pipe(args.prompt, width=128, height=128, steps=args.steps, seed=0, progress=False)[0]
    image.save(args.output)
    print(f"wrote {args.output} ({image.size[0]}x{image.size[1]}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
