"""Tiny offline T5 text stack for fast CPU tests (nothing is downloaded).

- `tiny_tokenizer()`: a transformers `T5Tokenizer` over a sentencepiece unigram vocabulary that is
  trained in memory from a small built-in corpus. T5 conventions as in Flan-UL2 (architecture §4.1-4.2):
  pad id 0, EOS id 1 appended to every prompt, unk id 2, no BOS, no sentinel ids.
- `tiny_t5_encoder(d_model=32, seed=0)`: a randomly initialised 2-layer `T5EncoderModel` with a
  gated-SiLU feed-forward (Flan-UL2's `feed_forward_proj`), dropout 0, in eval mode.
- `tiny_text_encoder(context_dim=24, d_model=32, seed=0)`: a `kandinsky3` `TextEncoder` over the two
  above, with a random projection (LayerNorm affine included) and a random null embedding, so that
  tests can tell pad slots, LayerNorm biases and the null embedding apart.

The sentencepiece model is trained once per test session (`functools.lru_cache`); every call returns
fresh objects, so a test that mutates a tokenizer or a model cannot leak into another test. Seeding
happens inside `torch.random.fork_rng`, so the global RNG is left untouched.
"""

from __future__ import annotations

import functools
import io

import sentencepiece as spm
import torch
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from kandinsky3.models.text_encoder import TextEncoder

__all__ = ["tiny_tokenizer", "tiny_t5_encoder", "tiny_text_encoder", "TINY_CORPUS"]

TINY_CORPUS = (
    "a photograph of a cat sitting on a red chair",
    "the quick brown fox jumps over the lazy dog",
    "a painting of a city at night with neon lights and rain",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of soup that looks like a monster, made of plasticine",
    "portrait of an old man with a beard, oil on canvas, highly detailed",
    "a small wooden house in a snowy forest under the northern lights",
    "blurry, low quality, watermark, text, deformed hands, extra fingers",
    "raccoons reading a newspaper inside a subway train",
    "a cozy living room with a fireplace, a sofa and green plants",
)


@functools.lru_cache(maxsize=None)
def _vocab(vocab_size: int = 160) -> tuple[tuple[str, float], ...]:
    """Train the unigram model in memory; return its (piece, score) table, id 0/1/2 = pad/EOS/unk."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 4),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the corpus is tiny; accept a smaller vocabulary
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = tuple((processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size()))
    assert pieces[0][0] == "<pad>" and pieces[1][0] == "</s>" and pieces[2][0] == "<unk>", pieces[:3]
    return pieces


def tiny_tokenizer() -> T5Tokenizer:
    """A fresh T5 tokenizer over the tiny vocabulary: pad 0, EOS 1 appended, unk 2, no sentinels."""
    # Built from the (piece, score) table rather than from a `spiece.model` file: transformers 5
    # needs protobuf to read a sentencepiece file, and protobuf is not a project dependency.
    return T5Tokenizer(vocab=list(_vocab()), extra_ids=0)


def tiny_t5_config(d_model: int = 32, vocab_size: int | None = None) -> T5Config:
    """Flan-UL2-shaped T5 config scaled down: 2 layers, 4 heads, gated-SiLU FFN, no dropout."""
    return T5Config(
        vocab_size=vocab_size if vocab_size is not None else len(_vocab()),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-silu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )


def tiny_t5_encoder(d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    """A fresh random 2-layer T5 encoder (fp32, CPU, eval mode); the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(tiny_t5_config(d_model))
    return model.eval()


def tiny_text_encoder(context_dim: int = 24, d_model: int = 32, seed: int = 0) -> TextEncoder:
    """A `TextEncoder` over the tiny T5 and tokenizer with random projection and null embedding."""
    encoder = TextEncoder(tiny_t5_encoder(d_model, seed), tiny_tokenizer(), context_dim=context_dim)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in (*encoder.projection.parameters(), encoder.null_embedding):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        encoder.projection[1].weight.add_(1.0)  # LayerNorm gain around 1, bias around 0
    return encoder
