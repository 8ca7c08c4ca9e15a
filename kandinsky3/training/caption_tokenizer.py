"""Train a small sentencepiece tokenizer on captions and wrap it as a T5 tokenizer.

The small Kandinsky 3 model has no pretrained Flan-UL2, so its T5 is trained from scratch with a
vocabulary fitted to the training captions (BPE pieces, cut into the fewest pieces per text). The
tokenizer keeps the Flan-UL2 conventions the text encoder relies on (architecture §4.1-4.2): pad id 0,
EOS id 1 appended to every prompt, unk id 2, no BOS and no sentinel ids. It is stored with
``save_pretrained`` (``tokenizer.json`` + ``tokenizer_config.json``) and loads like any T5 tokenizer
(:func:`kandinsky3.weights.t5.load_t5_tokenizer`).
"""

from __future__ import annotations

import io
import logging
from typing import Sequence

logger = logging.getLogger(__name__)

__all__ = ["train_caption_tokenizer"]


def train_caption_tokenizer(captions: Sequence[str], vocab_size: int = 512, *, max_sentences: int = 200_000):
    """A ``T5Tokenizer`` over the pieces of a BPE sentencepiece model trained on ``captions``.

    The pieces are wrapped as T5's unigram model with every piece scoring −1, so a text is cut
    into the *fewest* pieces: whole words when the corpus has them (a shapes caption is about
    12 ids), characters otherwise. (A unigram sentencepiece model on a small caption grammar
    keeps only ~60 mostly sub-word pieces, about 28 ids per caption.) ``vocab_size`` is an upper
    bound (``hard_vocab_limit=False``). Every character of the corpus is covered; unseen
    characters map to unk. Duplicate captions count once; at most ``max_sentences`` distinct
    captions are used, in first-seen order.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    corpus = list(dict.fromkeys(c for c in captions if c.strip()))[:max_sentences]
    if not corpus:
        raise ValueError("train_caption_tokenizer needs at least one non-empty caption")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), 0.0 if i < 3 else -1.0) for i in range(processor.get_piece_size())]
    if [p for p, _ in pieces[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise RuntimeError(f"sentencepiece gave special pieces {pieces[:3]}, expected <pad>, </s>, <unk>")
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    if list(tokenizer("")["input_ids"]) != [1]:
        raise RuntimeError("the wrapped tokenizer does not encode '' as [EOS]")
    logger.info("trained a %d-piece tokenizer on %d distinct captions", len(tokenizer), len(corpus))
    return tokenizer
