"""Run configs (JSON round trip, unknown keys, overrides, recipes, shipped files), the caption tokenizer,
the optimizers and learning-rate schedule, the EMA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _tiny_training import UNET, unet_config

from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.training.__main__ import build_parser
from kandinsky3.training.config import (MoVQRunConfig, UNetRunConfig, apply_overrides, config_from_dict, load_config,
                                        recipe_stages, save_config)
from kandinsky3.training.ema import EMA, ema_decay_at
from kandinsky3.training.optim import Lion, build_optimizer, learning_rate
from kandinsky3.training.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_config_json_round_trip(tmp_path):
    for config in (MoVQRunConfig(out_dir="x", betas=(0.5, 0.9)), unet_config(tmp_path, tmp_path / "movq")):
        save_config(config, tmp_path / "config.json")
        again = load_config(tmp_path / "config.json")
        assert again == config and type(again) is type(config)
        assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()


def test_config_rejects_unknown_keys_and_names_them():
    data = {**MoVQRunConfig().to_dict(), "learning_rate": 1e-3, "bogus": 1}
    with pytest.raises(ValueError, match=r"unknown keys \['bogus', 'learning_rate'\]"):
        config_from_dict(data)
    with pytest.raises(ValueError, match="'run' must be one of"):
        config_from_dict({"lr": 1.0})
    with pytest.raises(ValueError, match="unknown keys"):  # inside the embedded model config too
        config_from_dict({**MoVQRunConfig().to_dict(), "movq": {**MoVQRunConfig().movq, "width": 3}})


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="num_channels=9"):
        unet_config(tmp_path, tmp_path, mode="inpainting", init_unet="x")
    with pytest.raises(ValueError, match="exactly one of text_encoder_path"):
        unet_config(tmp_path, tmp_path, text_encoder_path="t5")
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        MoVQRunConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        MoVQRunConfig(optimizer="sgd")


def test_overrides_parse_json_and_reach_into_model_dicts():
    data = apply_overrides(MoVQRunConfig().to_dict(), ["lr=3e-4", "movq.ch=16", "out_dir=runs/a", "fsdp=true",
                                                       "betas=[0.8,0.9]"])
    config = config_from_dict(data)
    assert config.lr == 3e-4 and config.movq["ch"] == 16 and config.out_dir == "runs/a" and config.fsdp is True
    assert config.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["lr"])
    args = build_parser().parse_args(["c.json", "lr=1", "--resume"])
    assert args.config == "c.json" and args.overrides == ["lr=1"] and args.resume


@pytest.mark.parametrize("name", ["small_movq", "small_unet", "small_inpainting", "smoke_movq", "smoke_unet"])
def test_shipped_run_configs_load(name):
    config = load_config(CONFIGS / f"{name}.json")
    assert config.out_dir.startswith("runs/")


def test_full_recipe_has_the_report_schedule():
    """SPEC §8: 256/384/512/768/mixed, 600k/500k/400k/250k/350k steps, global batch = per-GPU × GPUs; then
    inpainting with Lion 1e-5, 10k warm-up, 250k steps; each stage starts from the previous export."""
    stages = recipe_stages(json.loads((CONFIGS / "kandinsky3_full_recipe.json").read_text()))
    base = [s for s in stages if s.mode == "base"]
    assert [s.image_size for s in base[:4]] == [256, 384, 512, 768]
    assert all(768 * 768 <= h * w <= 1024 * 1024 for h, w in base[4].resolution_buckets)
    assert [s.max_steps for s in base] == [600_000, 500_000, 400_000, 250_000, 350_000]
    assert [s.batch_size for s in base] == [20 * 104, 10 * 104, 10 * 104, 4 * 416, 416]
    assert all(not s.train_text_encoder and s.unet_config.num_channels == 4 for s in base)
    inpainting = stages[-1]
    assert (inpainting.mode, inpainting.optimizer, inpainting.lr, inpainting.warmup_steps, inpainting.max_steps) == (
        "inpainting", "lion", 1e-5, 10_000, 250_000)
    for previous, stage in zip(stages, stages[1:]):
        assert stage.init_unet == f"{previous.out_dir}/final/unet"


def test_tokenizer_round_trips_captions_and_appends_eos(tmp_path):
    data = ShapesDataset(300, image_size=32, seed=1)
    captions = [data[i][1] for i in range(300)]
    tokenizer = train_tokenizer(captions, vocab_size=256)
    save_tokenizer(tokenizer, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    assert len(loaded) <= 256
    for caption in captions:
        ids = loaded(caption)["input_ids"]
        assert ids[-1] == 1 and 1 not in ids[:-1] and 0 not in ids and 2 not in ids
        assert loaded.decode(ids, skip_special_tokens=True) == caption
        assert ids == tokenizer(caption)["input_ids"]
    assert len(loaded(captions[0])["input_ids"]) <= len(captions[0].split()) + 1  # whole words: one id each
    assert loaded("")["input_ids"] == [1]
    from _tiny_text import tiny_t5_encoder  # the TextEncoder accepts it (it checks pad / EOS conventions)

    TextEncoder(tiny_t5_encoder(), loaded, context_dim=8)


def test_learning_rate_warmup_is_a_pure_function_of_the_step():
    assert [learning_rate(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(0, 2e-4, 0) == 2e-4


def test_lion_step_matches_the_paper_update():
    """p ← p − lr·(sign(β1·m + (1−β1)·g) + λ·p); m ← β2·m + (1−β2)·g (arXiv 2302.06675, Algorithm 2)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    m = torch.zeros(3)
    reference = p.detach().clone()
    for g in (torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-1.0, 0.2, 0.4])):
        p.grad = g.clone()
        optimizer.step()
        update = torch.sign(0.9 * m + 0.1 * g)
        reference = reference * (1 - 0.1 * 0.5) - 0.1 * update
        m = 0.99 * m + 0.01 * g
        assert torch.allclose(p.detach(), reference, atol=1e-7)
        assert torch.allclose(optimizer.state[p]["exp_avg"], m, atol=1e-7)


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer("adamw", model.named_parameters(), 1e-3, (0.9, 0.99), 0.1)
    decayed = [p.shape for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed == [torch.Size([4, 3])]


def test_ema_update_warmup_and_exact_swap():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.99)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # warm-up decay min(0.99, 1/10) = 0.1
    assert ema_decay_at(0, 0.99) == pytest.approx(0.1) and ema_decay_at(10**6, 0.99) == 0.99
    assert torch.allclose(ema.state_dict()["weight"], 0.1 * start["weight"] + 0.9 * model.weight.detach())
    live = model.weight.detach().clone()
    with ema.swapped(model):
        assert torch.allclose(model.weight, 0.1 * start["weight"] + 0.9 * live)
    assert torch.equal(model.weight, live)  # restored bit for bit


def test_unet_config_dict_is_embedded_verbatim(tmp_path):
    config = unet_config(tmp_path, tmp_path)
    assert isinstance(config, UNetRunConfig) and config.unet_config == UNET
    assert math.isclose(config.cfg_dropout, 0.1)
