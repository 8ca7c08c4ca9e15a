"""Pretrain the small model's T5 encoder on captions alone, before the U-Net run that keeps it frozen.

    kandinsky3 train configs/small_text.json [--resume]

Why: Kandinsky 3 conditions on a frozen, pretrained T5. The bundled small model has no pretrained T5, and a
frozen *random* T5 mixes each token with its neighbours in no useful way: the U-Net then draws the objects a prompt
names but cannot tell which colour and shape belong to which position in a two-object prompt. Trained jointly with
the U-Net instead, the T5 learnt the seen colour-shape pairs as wholes and failed the held-out ones (model card).

Objective: tagging. Every word of an object's phrase ("a small red circle on the left") is tagged with that
object's colour, shape, size and position as the caption states them (a relation such as "above" states the
positions it implies; an unstated size or position is its own class), by one linear head per attribute on the
encoder's output states, the states the U-Net's cross-attention reads (cross-entropy, summed over the heads; words
outside object phrases are not scored). So the "left" token must carry "red circle" and the "red" token "left":
each object's tokens carry the whole object, while no label depends on which colour goes with which shape, so
nothing rewards learning the seen pairs as wholes. With ``text.tag_background`` every word, object word or not, is
also tagged with the caption's background colour ("unstated" when it names none): the background words are then
scored too, and every token carries the background. (Rewriting the caption with a T5 decoder was tried first: the
decoder's own language model would not write a held-out pair such as "red triangle".)

Captions are drawn afresh every step from the training split (held-out colour-shape pairs never occur); a step's
batch is a pure function of (run.seed, step), so a resumed run continues exactly as an uninterrupted one. The run
logs the share of evaluation captions, seen and held-out split, whose every object word gets every tag right,
every ``run.sample_interval`` steps and at the end, and exports ``final/text_encoder/``: the encoder as a plain T5
folder (weights, ``config.json``, tokenizer), which a U-Net run names as ``text.encoder_path``. One process; the
model is a few MB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.shapes import (BACKGROUNDS, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, caption, eval_prompts, parse_caption,
                           sample_scene, word_objects)
from ..errors import UsageError
from .checkpoint import CHECKPOINT, read_checkpoint, restore_training_state, save_checkpoint
from .config import TextTrainConfig
from .ema import build_ema
from .image_datasets import build_dataset, dataset_captions
from .initial_models import fresh_t5_config, run_tokenizer
from .optim import autocast, build_optimizer, make_grad_scaler, optimizer_step, scheduled_lr, set_lr
from .run_log import EXPORT, RUN_LOG, TrainingLog, check_run_folder, due, prepare_out_dir

logger = logging.getLogger(__name__)

__all__ = ["train_text", "CaptionTagger", "Tagging", "TAGS", "BACKGROUND_TAG", "caption_batch", "tagging_accuracy",
           "EVAL_CAPTIONS"]

#: The tags of an object word: each attribute's classes ("unstated" when the caption does not say).
TAGS = {"colour": OBJECT_COLOURS, "shape": SHAPES, "size": (*SIZES, "unstated"), "position": (*POSITIONS, "unstated")}
#: The tag every word gets with ``text.tag_background``: the caption's background colour.
BACKGROUND_TAG = {"background": (*BACKGROUNDS, "unstated")}

EVAL_CAPTIONS = 500  # evaluation captions per split
_STREAM = 2  # numpy seed stream of the training captions (the shapes set uses 0 and 1)
IGNORE = -100  # label of a token that is not scored


def tag_set(background: bool) -> dict[str, tuple[str, ...]]:
    """The attributes a run tags and their classes: :data:`TAGS`, plus :data:`BACKGROUND_TAG` with ``background``."""
    return {**TAGS, **BACKGROUND_TAG} if background else dict(TAGS)


def train_text(config: TextTrainConfig, *, resume: bool = False) -> Path:
    """Run (or, with ``resume``, continue) a text pretraining run; returns ``run.out_dir``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("the text trainer runs in one process; start it without torchrun")
    check_run_folder(Path(config.run.out_dir), resume)
    out_dir = prepare_out_dir(config, is_main=True)
    device = torch.device("cuda" if config.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    text, optim, schedule = config.text, config.optim, config.schedule
    # the tokenizer of the dataset's captions (as a U-Net run with a fresh T5 trains it), the fresh model
    tokenizer = run_tokenizer(text.tokenizer_dir, text.tokenizer_vocab_size,
                              lambda: dataset_captions(build_dataset(config.data)), out_dir, True)
    tagging = Tagging(tokenizer, text.max_length, background=text.tag_background)
    model = fresh_model(config, tokenizer).to(device)
    optimizer = build_optimizer(optim.name, model.named_parameters(), optim.lr, optim.betas, optim.weight_decay)
    scaler = make_grad_scaler(config.run.precision, device)
    ema = build_ema(model, config.ema)
    step = 0
    if resume:
        state = read_checkpoint(out_dir, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = restore_training_state(state, scaler, ema)
    logger.info("T5 encoder %.2fM parameters, tagging heads %.4fM", _millions(model.t5), _millions(model.heads))
    log = TrainingLog(out_dir / RUN_LOG, ["loss", "grad_norm"], config.run.log_interval, step, True)
    model.train()
    while step < schedule.max_steps:
        set_lr(optimizer, scheduled_lr(step, optim.lr, schedule))
        ids, mask, labels = tagging.batch(caption_batch(config.run.seed, step, schedule.batch_size), device)
        with autocast(device, config.run.precision):
            loss = model.loss(ids, mask, labels)
        scaler.scale(loss).backward()
        log.add(loss=loss, grad_norm=optimizer_step(optimizer, scaler, model.parameters(), optim.grad_clip))
        if ema is not None:
            ema.update(model, step)
        step += 1
        if log.due(step):
            log.line(step, lr=optimizer.param_groups[0]["lr"])
        if due(step, config.run.sample_interval) and step < schedule.max_steps:
            with ema.swapped(model) if ema is not None else contextlib.nullcontext():
                log_accuracy(model, tagging, step)
        if due(step, config.run.checkpoint_interval) or step == schedule.max_steps:
            save_checkpoint(out_dir / CHECKPOINT, step=step, config=config, model=model.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler, ema=ema.state_dict() if ema else None)
    with ema.swapped(model) if ema is not None else contextlib.nullcontext():
        log_accuracy(model, tagging, step)
        export_encoder(model.t5, tokenizer, out_dir / EXPORT / "text_encoder")
    return out_dir


class CaptionTagger(nn.Module):
    """A ``T5EncoderModel`` and one linear head per attribute of ``tags`` on its output states."""

    def __init__(self, t5: nn.Module, tags: dict[str, tuple[str, ...]] = TAGS):
        super().__init__()
        self.t5 = t5
        self.heads = nn.ModuleDict({name: nn.Linear(t5.config.d_model, len(classes)) for name, classes in tags.items()})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (B, n, classes) of every attribute."""
        states = self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return {name: head(states) for name, head in self.heads.items()}

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: dict[str, torch.Tensor]):
        """Cross-entropy of every attribute over the scored tokens, summed over the attributes."""
        logits = self(input_ids, attention_mask)
        return sum(F.cross_entropy(logits[name].flatten(0, 1).float(), labels[name].flatten(), ignore_index=IGNORE)
                   for name in self.heads)


def fresh_model(config: TextTrainConfig, tokenizer) -> CaptionTagger:
    """A :class:`CaptionTagger` with fresh weights drawn from ``run.seed`` (the caller's RNG untouched)."""
    from transformers import T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        return CaptionTagger(T5EncoderModel(fresh_t5_config(config.text.t5_config, tokenizer)),
                             tag_set(config.text.tag_background))


def caption_batch(seed: int, step: int, batch_size: int) -> list[str]:
    """The captions of step ``step``: ``batch_size`` random training-split scenes, each captioned at random."""
    rng = np.random.default_rng([_STREAM, seed, step])
    return [caption(sample_scene(rng, "train"), rng) for _ in range(batch_size)]


class Tagging:
    """Token ids and per-token tags of captions: each word is tokenized on its own (the ids equal the caption's,
    as the caption tokenizer cuts at spaces) and its tokens get the tags of its object; with ``background``, every
    token also gets the caption's background (:data:`BACKGROUND_TAG`)."""

    def __init__(self, tokenizer, max_length: int, *, background: bool = False):
        self.tokenizer, self.max_length, self._pieces = tokenizer, max_length, {}
        self.names = tuple(tag_set(background))

    def tags(self, text: str) -> tuple[list[int], dict[str, list[int]]]:
        """Token ids (EOS last, at most ``max_length``) and each attribute's class per token (IGNORE: unscored)."""
        ids, tags = [], {name: [] for name in self.names}
        background = (parse_caption(text).background or "unstated") if "background" in self.names else None
        for word, obj in zip(*word_objects(text)):
            if word not in self._pieces:
                self._pieces[word] = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            pieces = self._pieces[word]
            ids += pieces
            for name, classes in TAGS.items():
                value = None if obj is None else (getattr(obj, name) or "unstated")
                tags[name] += [IGNORE if value is None else classes.index(value)] * len(pieces)
            if background is not None:
                tags["background"] += [BACKGROUND_TAG["background"].index(background)] * len(pieces)
        keep = self.max_length - 1
        ids = ids[:keep] + [self.tokenizer.eos_token_id]
        return ids, {name: values[:keep] + [IGNORE] for name, values in tags.items()}

    def batch(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(ids, mask, labels) of ``captions``, padded to the longest (pad id 0, label IGNORE)."""
        rows = [self.tags(text) for text in captions]
        n = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r[0] + [0] * (n - len(r[0])) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (n - len(r[0])) for r in rows])
        labels = {name: torch.tensor([r[1][name] + [IGNORE] * (n - len(r[1][name])) for r in rows]).to(device)
                  for name in self.names}
        return ids.to(device), mask.to(device), labels


@torch.no_grad()
def tagging_accuracy(model: CaptionTagger, tagging: Tagging, split: str, n: int = EVAL_CAPTIONS) -> float:
    """Share of ``n`` evaluation captions of ``split`` whose every object word gets every tag right."""
    device = next(model.parameters()).device
    ids, mask, labels = tagging.batch([text for text, _ in eval_prompts(n, split)], device)
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, mask)
    finally:
        model.train(was_training)
    right = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
    for name in tagging.names:
        scored = labels[name] != IGNORE
        right &= ((logits[name].argmax(-1) == labels[name]) | ~scored).all(dim=1)
    return float(right.float().mean())


def log_accuracy(model: CaptionTagger, tagging: Tagging, step: int) -> None:
    seen, heldout = (tagging_accuracy(model, tagging, split) for split in ("seen", "heldout"))
    logger.info("step %d  captions tagged right: seen %.1f %%, held-out %.1f %%", step, 100 * seen, 100 * heldout)


def export_encoder(t5: nn.Module, tokenizer, folder: Path) -> None:
    """``t5`` and the tokenizer as a plain T5 folder, written beside ``folder`` and renamed over it."""
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    t5.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(folder)
    logger.info("exported the T5 encoder to %s", folder)


def _millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
