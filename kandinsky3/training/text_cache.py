"""A frozen T5 run once per caption: its states computed in one pass, then looked up instead of computed.

Kandinsky 3 keeps its T5 frozen, so every caption has one T5 result for the whole run. Both trainers that
condition on a frozen T5 compute those results once (:func:`t5_states`) and put a :class:`CachedT5` in T5's place
inside the :class:`~kandinsky3.models.text_encoder.TextEncoder`; everything after T5 (the trained projection, the
null embedding, :func:`kandinsky3.conditioning.training_conditions`) runs unchanged, so a training sample still gets
exactly what the pipeline gives its prompt (a caption's states differ from those of a per-step T5 call by float
rounding only: another batch, another padding width).

- The LoRA / full fine-tune (:mod:`.finetune`): the 8.6B T5 of the real model runs once, streamed, and its states
  are cached on disk; the encoder's weights are then freed.
- The U-Net trainer (:mod:`.train_unet`) with ``text.train_t5`` off: T5 ran on every batch, 6 % of a step of the
  small model on 2 CPU cores (``benchmarks/train_step.py``); the states live in memory and T5 itself is put back
  for the export.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..models.text_encoder import TextEncoder, cut_length

logger = logging.getLogger(__name__)

__all__ = ["CachedT5", "look_up_t5", "t5_states"]


class CachedT5(nn.Module):
    """T5 encoder states of known token sequences, looked up instead of computed (a frozen T5 gives each sequence
    one result). Called as T5 is, ``(input_ids=(b,w), attention_mask=(b,w))`` → ``((b,w,D) states,)``.

    Built from ids and 0/1 masks (M,n) and states (M,n,D), as :func:`t5_states` returns them (kept on the CPU). A
    row of a batch is found by its real tokens (the ids under its mask), one dictionary lookup; a sequence that is
    not cached is a KeyError naming it."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor):
        super().__init__()
        self.states = states
        lengths = attention_mask.sum(dim=1).tolist()
        self.rows = {tuple(ids[:n]): row for row, (ids, n) in enumerate(zip(input_ids.tolist(), lengths))}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        width = input_ids.shape[1]
        if width > self.states.shape[1]:
            raise KeyError(f"token sequences of width {width} are longer than any cached one")
        lengths = attention_mask.sum(dim=1).tolist()
        rows = [self.rows.get(tuple(ids[:n])) for ids, n in zip(input_ids.tolist(), lengths)]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            raise KeyError(f"token sequences {missing} of the batch are not in the text cache (captions and sample "
                           f"prompts only)")
        return (self.states[torch.tensor(rows), :width].to(input_ids.device),)


@torch.no_grad()
def t5_states(encoder: TextEncoder, prompts: list[str], chunk: int = 256) -> dict[str, torch.Tensor]:
    """T5's last hidden states of every distinct prompt: ids and masks (M,n), states (M,n,D) on the CPU, n = the
    longest prompt + 1, encoded in fixed chunks (so always the same values; a streamed T5 reads its weights once
    per chunk)."""
    prompts = list(dict.fromkeys(prompts))
    ids, mask = encoder.tokenize(prompts)
    width = cut_length(mask)
    ids, mask = ids[:, :width], mask[:, :width]
    parts = [encoder.t5(input_ids=ids[i:i + chunk].to(encoder.device),
                        attention_mask=mask[i:i + chunk].to(encoder.device))[0].cpu()
             for i in range(0, len(prompts), chunk)]
    logger.info("T5 encoded %d distinct captions and prompts", len(prompts))
    return {"input_ids": ids, "attention_mask": mask, "states": torch.cat(parts)}


def look_up_t5(encoder: TextEncoder, prompts: list[str]) -> nn.Module:
    """Run ``encoder``'s frozen T5 once over ``prompts`` and put a :class:`CachedT5` of them in its place; returns
    the T5 module, to put back when its weights are needed (an export)."""
    t5 = encoder.t5
    encoder.t5 = CachedT5(**t5_states(encoder, prompts))
    return t5
