"""The text pretraining run (kandinsky3.training.train_text): what it learns from, how captions are tagged and
scored, that it learns, that it resumes exactly, and that its export is a T5 folder a U-Net run starts from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny_training import text_config, unet_config
from kandinsky3.data.shapes import HELD_OUT_PAIRS, eval_prompts, parse_caption
from kandinsky3.errors import UsageError
from kandinsky3.training.checkpoint import load_checkpoint
from kandinsky3.training.config import apply_overrides, config_to_dict, parse_config
from kandinsky3.training.initial_models import pretrained_text, text_encoder_for_run
from kandinsky3.training.train_text import (BACKGROUND_TAG, IGNORE, TAGS, Tagging, caption_batch, tagging_accuracy,
                                             train_text)
from kandinsky3.weights.t5 import load_t5, load_t5_tokenizer

BUNDLED_TOKENIZER = "kandinsky3/assets/tiny/base/text_encoder"


def test_caption_batches_are_training_captions_fixed_by_seed_and_step():
    captions = caption_batch(0, 7, 64)
    assert captions == caption_batch(0, 7, 64)
    assert captions != caption_batch(0, 8, 64) and captions != caption_batch(1, 7, 64)
    for text in captions:
        assert not any((obj.colour, obj.shape) in HELD_OUT_PAIRS for obj in parse_caption(text).objects)


@pytest.mark.parametrize("split", ["seen", "heldout"])
def test_tagged_ids_are_the_ids_the_pipeline_gives_each_caption(split):
    tokenizer = load_t5_tokenizer(BUNDLED_TOKENIZER)
    tagging = Tagging(tokenizer, max_length=128)
    for text, _ in eval_prompts(100, split):
        ids, tags = tagging.tags(text)
        assert ids == tokenizer(text)["input_ids"]
        assert all(len(values) == len(ids) for values in tags.values())


def test_every_word_of_an_object_phrase_carries_the_whole_object():
    tokenizer = load_t5_tokenizer(BUNDLED_TOKENIZER)
    text = "a picture of a blue square on the right and a small red circle on the left"
    ids, tags = Tagging(tokenizer, max_length=128).tags(text)
    words = [tokenizer.decode([i]) for i in ids]

    def tag(word: str, name: str):
        value = tags[name][words.index(word)]
        return None if value == IGNORE else TAGS[name][value]

    assert (tag("right", "colour"), tag("right", "shape"), tag("right", "size")) == ("blue", "square", "unstated")
    assert (tag("red", "position"), tag("circle", "size"), tag("left", "shape")) == ("left", "small", "circle")
    assert tag("picture", "colour") is None and tag("and", "position") is None and tags["shape"][-1] == IGNORE
    relation = Tagging(tokenizer, 128).tags("a green triangle above a yellow circle")
    assert [TAGS["position"][v] for v in relation[1]["position"] if v != IGNORE] == ["top"] * 3 + ["bottom"] * 3


def test_truncated_captions_keep_their_eos_last():
    tokenizer = load_t5_tokenizer(BUNDLED_TOKENIZER)
    ids, tags = Tagging(tokenizer, max_length=4).tags("a red circle on the left")
    assert len(ids) == 4 and ids[-1] == tokenizer.eos_token_id and all(len(v) == 4 for v in tags.values())


class _Oracle(nn.Module):
    """Logits that put each token's labelled class first, for the captions it was built on; ``wrong`` captions get
    one tag of their first object word off by one class."""

    def __init__(self, tagging: Tagging, captions: list[str], wrong: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.ids, _, self.labels = tagging.batch(captions, "cpu")
        self.wrong = wrong

    def forward(self, ids, mask):
        assert torch.equal(ids, self.ids)
        logits = {}
        for name, labels in self.labels.items():
            target = labels.clamp(min=0).clone()
            if name == "shape":
                for row in range(self.wrong):
                    first = int((labels[row] != IGNORE).nonzero()[0])
                    target[row, first] = (target[row, first] + 1) % len(TAGS[name])
            logits[name] = nn.functional.one_hot(target, len(TAGS[name])).float()
        return logits


@pytest.mark.parametrize("wrong", [0, 3])
def test_tagging_accuracy_counts_captions_with_every_tag_right(wrong):
    tagging = Tagging(load_t5_tokenizer(BUNDLED_TOKENIZER), max_length=128)
    captions = [text for text, _ in eval_prompts(20, "heldout")]
    accuracy = tagging_accuracy(_Oracle(tagging, captions, wrong), tagging, "heldout", 20)
    assert accuracy == pytest.approx((20 - wrong) / 20)


def test_a_run_learns_and_exports_a_t5_folder_a_unet_run_starts_from(tmp_path):
    out = train_text(text_config(tmp_path / "text", "schedule.max_steps=40", "schedule.batch_size=32",
                                 "optim.lr=0.01"))
    losses = [float(line.split(",")[1]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # it learns (a random tagger stays at ~6)
    folder = out / "final" / "text_encoder"
    assert pretrained_text(folder).conditioning == {}  # a plain T5 folder: the U-Net run adds the projection
    trained = {k[len("t5."):]: v for k, v in load_checkpoint(out / "checkpoint.pt")["model"].items()
               if k.startswith("t5.")}
    for key, value in load_t5(folder, dtype=torch.float32).state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    assert load_t5_tokenizer(folder).get_vocab() == load_t5_tokenizer(out / "tokenizer").get_vocab()
    unet_run = unet_config(tmp_path / "unet", tmp_path, f"text.encoder_path={folder}", "text.t5_config={}",
                           "text.train_t5=false")
    encoder = text_encoder_for_run(unet_run, [], tmp_path / "unet", True)
    for key, value in encoder.t5.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = train_text(text_config(tmp_path / "whole", "run.checkpoint_interval=2", "ema.decay=0.9"))
    half = text_config(tmp_path / "half", "run.checkpoint_interval=2", "ema.decay=0.9", "schedule.max_steps=2")
    train_text(half)
    train_text(parse_config(apply_overrides(config_to_dict(half), ["schedule.max_steps=4"])), resume=True)
    a, b = (load_checkpoint(folder / "checkpoint.pt") for folder in (whole, tmp_path / "half"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=0)


def test_the_text_trainer_refuses_folder_data_and_several_processes(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="shapes captions"):
        text_config(".", "data.dataset=folder", "data.data_root=x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="one process"):
        train_text(text_config(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_with_background_tags_every_word_carries_the_captions_background():
    tokenizer = load_t5_tokenizer(BUNDLED_TOKENIZER)
    tagging = Tagging(tokenizer, max_length=128, background=True)
    ids, tags = tagging.tags("a picture of a red circle above a small blue square on a gray background")
    assert [BACKGROUND_TAG["background"][v] for v in tags["background"][:-1]] == ["gray"] * (len(ids) - 1)
    assert tags["background"][-1] == IGNORE  # EOS
    assert tags["colour"] == Tagging(tokenizer, max_length=128).tags("a picture of a red circle above a small blue "
                                                                     "square on a gray background")[1]["colour"]
    _, plain = tagging.tags("a red circle")
    assert {BACKGROUND_TAG["background"][v] for v in plain["background"][:-1]} == {"unstated"}
    assert "background" not in Tagging(tokenizer, max_length=128).tags("a red circle on a pink background")[1]


def test_a_background_tagging_run_scores_the_background_head(tmp_path):
    config = text_config(tmp_path / "text", "schedule.max_steps=2", "schedule.batch_size=8",
                         "text.tag_background=true")
    out = train_text(config)
    heads = {k for k in load_checkpoint(out / "checkpoint.pt")["model"] if k.startswith("heads.")}
    assert "heads.background.weight" in heads and "heads.colour.weight" in heads
    assert "heads.background.weight" not in {
        k for k in load_checkpoint(train_text(text_config(tmp_path / "plain", "schedule.max_steps=2",
                                                          "schedule.batch_size=8")) / "checkpoint.pt")["model"]}
