"""Run configs (JSON round trip, unknown and missing keys, types, overrides, recipes, shipped files, the command
line), the caption tokenizer, the optimizers and learning-rate schedule, the EMA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_training import MOVQ, UNET, movq_config, unet_config

from kandinsky3.data.shapes import P_AND, ShapesDataset
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.models.unet_config import UNetConfig
from kandinsky3.training.__main__ import build_parser, main
from kandinsky3.training.caption_tokenizer import train_caption_tokenizer
from kandinsky3.training.config import (EMAConfig, MoVQTrainConfig, UNetTrainConfig, apply_overrides, config_to_dict,
                                        load_config, load_run_configs, parse_config, recipe_stages, save_config)
from kandinsky3.training.ema import EMA, ema_decay_at
from kandinsky3.training.image_datasets import build_dataset
from kandinsky3.training.optim import Lion, build_optimizer, learning_rate, scheduled_lr
from kandinsky3.weights.t5 import load_t5_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_config_json_round_trip(tmp_path):
    for config in (movq_config(tmp_path, MOVQ, "optim.betas=[0.5,0.9]"), unet_config(tmp_path, tmp_path / "movq")):
        save_config(config, tmp_path / "config.json")
        again = load_config(tmp_path / "config.json")
        assert again == config and type(again) is type(config)
        assert json.loads((tmp_path / "config.json").read_text()) == config_to_dict(config)


def test_config_is_parsed_once_into_nested_typed_sections(tmp_path):
    """Sections are frozen dataclasses; the architecture is a UNetConfig object, lists become tuples, ints
    given for floats become floats."""
    config = unet_config(tmp_path, tmp_path, "optim.lr=1", "data.resolution_buckets=[[8, 16]]",
                         "data.dataset=folder", "data.data_root=x")
    assert isinstance(config, UNetTrainConfig) and isinstance(config.model.unet, UNetConfig)
    assert config.model.unet == UNET
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.data.resolution_buckets == ((8, 16),) and config.optim.betas == (0.9, 0.999)
    with pytest.raises(AttributeError):
        config.optim.lr = 2.0  # frozen


def test_config_rejects_unknown_and_missing_keys_and_names_them(tmp_path):
    data = config_to_dict(movq_config(tmp_path, MOVQ))
    data["optim"]["learning_rate"] = 1e-3
    del data["schedule"]["max_steps"]
    with pytest.raises(ValueError, match=r"unknown keys \['optim.learning_rate'\]"):
        parse_config(data)
    del data["optim"]["learning_rate"]
    with pytest.raises(ValueError, match=r"missing keys \['schedule.max_steps'\]"):
        parse_config(data)
    with pytest.raises(ValueError, match=r"missing keys \['samples'\]"):  # a whole section
        parse_config({k: v for k, v in config_to_dict(unet_config(tmp_path, tmp_path)).items() if k != "samples"})
    with pytest.raises(ValueError, match="'trainer' in"):
        parse_config({"optim": {}})
    with pytest.raises(ValueError, match=r"model: .*unknown keys \['width'\]"):  # inside the model architecture too
        parse_config({**config_to_dict(movq_config(tmp_path, MOVQ)), "model": {**MOVQ.to_dict(), "width": 3}})


def test_config_values_must_have_the_field_types(tmp_path):
    data = config_to_dict(unet_config(tmp_path, tmp_path))
    for key, value, message in [("optim.lr", '"fast"', "optim.lr must be of type float"),
                                ("text.train_t5", "1", "text.train_t5 must be of type bool"),
                                ("schedule.max_steps", "2.5", "schedule.max_steps must be of type int"),
                                ("optim.betas", "[0.9]", "optim.betas must be a list of 2 entries"),
                                ("samples.prompts", "[1]", r"samples.prompts\[0\] must be of type str")]:
        with pytest.raises(ValueError, match=message):
            parse_config(apply_overrides(data, [f"{key}={value}"]))


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="num_channels=9"):
        unet_config(tmp_path, tmp_path, "model.mode=inpainting", "model.init_unet=x")
    with pytest.raises(ValueError, match="exactly one of text.encoder_path"):
        unet_config(tmp_path, tmp_path, "text.encoder_path=t5")
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        movq_config(tmp_path, MOVQ, "schedule.batch_size=10", "schedule.grad_accum=3")
    with pytest.raises(ValueError, match="optim.name must be one of"):
        movq_config(tmp_path, MOVQ, "optim.name=sgd")
    with pytest.raises(ValueError, match="run.fsdp: the MoVQ trainer supports DDP only"):
        movq_config(tmp_path, MOVQ, "run.fsdp=true")
    mixed = unet_config(tmp_path, tmp_path, "data.and_captions=0.7")
    assert build_dataset(mixed.data).and_captions == 0.7 and mixed.data.and_captions == 0.7
    assert unet_config(tmp_path, tmp_path).data.and_captions == P_AND  # the default is the grammar's own
    with pytest.raises(ValueError, match="data.and_captions must be in"):
        unet_config(tmp_path, tmp_path, "data.and_captions=1.2")
    with pytest.raises(ValueError, match="a folder dataset has its own"):
        unet_config(tmp_path, tmp_path, "data.dataset=folder", "data.data_root=x", "data.and_captions=0.7")
    assert build_dataset(unet_config(tmp_path, tmp_path, "data.and_order=reading").data).and_order == "reading"
    assert unet_config(tmp_path, tmp_path).data.and_order == "any"
    with pytest.raises(ValueError, match="data.and_order must be one of"):
        unet_config(tmp_path, tmp_path, "data.and_order=sorted")
    folder = unet_config(tmp_path, tmp_path, "data.dataset=folder", "data.data_root=x", "data.and_order=reading")
    assert folder.data.and_order == "reading"  # a shapes config pointed at a folder: its captions are the folder's


def test_overrides_parse_json_and_reach_into_model_dicts(tmp_path):
    config = movq_config(tmp_path, MOVQ, "optim.lr=3e-4", "model.ch=16", "run.out_dir=runs/a", "optim.betas=[0.8,0.9]")
    assert config.optim.lr == 3e-4 and config.model.ch == 16 and config.run.out_dir == "runs/a"
    assert config.optim.betas == (0.8, 0.9) and isinstance(config, MoVQTrainConfig)
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["lr"])
    args = build_parser().parse_args(["c.json", "optim.lr=1", "--resume"])
    assert args.config == "c.json" and args.overrides == ["optim.lr=1"] and args.resume


def test_train_command_reports_a_bad_config_in_one_line(tmp_path, capsys):
    """A mistake in the config file or an override ends the command with status 2 and the key's name."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config_to_dict(movq_config(tmp_path, MOVQ))))
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "optim.learnig_rate=1"])
    assert exit_info.value.code == 2 and "unknown keys ['optim.learnig_rate']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(path), "--stage", "1"])
    assert "--stage is for recipes" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["small_movq", "small_movq_decoder", "small_text", "small_unet", "small_inpainting",
                                  "smoke_movq", "smoke_unet", "finetune_tiny"])
def test_shipped_run_configs_load(name):
    config = load_config(CONFIGS / f"{name}.json")
    assert config.run.out_dir.startswith("runs/")


def test_the_fine_tuning_config_starts_from_the_bundled_model_and_matches_its_unet():
    """configs/finetune_tiny.json reads U-Net, MoVQ and text encoder from the bundled folder (paths relative to the
    repository root) and describes exactly the bundled U-Net, so init_unet loads with strict=True."""
    config = load_config(CONFIGS / "finetune_tiny.json")
    bundled = "kandinsky3/assets/tiny/base"
    assert config.model.init_unet == config.model.movq_path == config.text.encoder_path == bundled
    shipped = json.loads((CONFIGS.parent / bundled / "unet" / "config.json").read_text())
    assert config.model.unet == UNetConfig.from_dict(shipped)
    assert config.data.dataset == "folder" and config.data.image_size == 128 and not config.text.train_t5


def test_full_recipe_has_the_report_schedule():
    """practice §8: 256/384/512/768/mixed, 600k/500k/400k/250k/350k steps, global batch = per-GPU × GPUs; then
    inpainting with Lion 1e-5, 10k warm-up, 250k steps; each stage starts from the previous export."""
    stages = recipe_stages(json.loads((CONFIGS / "kandinsky3_full_recipe.json").read_text()))
    base = [s for s in stages if s.model.mode == "base"]
    assert [s.data.image_size for s in base[:4]] == [256, 384, 512, 768]
    assert all(768 * 768 <= h * w <= 1024 * 1024 for h, w in base[4].data.resolution_buckets)
    assert [s.schedule.max_steps for s in base] == [600_000, 500_000, 400_000, 250_000, 350_000]
    assert [s.schedule.batch_size for s in base] == [20 * 104, 10 * 104, 10 * 104, 4 * 416, 416]
    assert all(not s.text.train_t5 and s.model.unet.num_channels == 4 for s in base)
    inpainting = stages[-1]
    assert (inpainting.model.mode, inpainting.optim.name, inpainting.optim.lr, inpainting.schedule.warmup_steps,
            inpainting.schedule.max_steps) == ("inpainting", "lion", 1e-5, 10_000, 250_000)
    assert inpainting.model.unet == UNetConfig.from_dict({**base[0].model.unet.to_dict(), "num_channels": 9})
    assert stages[0].text.encoder_path == "weights/flan_ul2_encoder" and stages[0].model.init_unet == ""
    for previous, stage in zip(stages, stages[1:]):
        assert stage.model.init_unet == stage.text.encoder_path == f"{previous.run.out_dir}/final"
    only = load_run_configs(CONFIGS / "kandinsky3_full_recipe.json", ["run.seed=3"], stage=2)
    assert len(only) == 1 and only[0].run.out_dir == stages[2].run.out_dir and only[0].run.seed == 3


def test_tokenizer_round_trips_captions_and_appends_eos(tmp_path):
    data = ShapesDataset(300, image_size=32, seed=1)
    captions = [data[i][1] for i in range(300)]
    tokenizer = train_caption_tokenizer(captions, vocab_size=256)
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_t5_tokenizer(tmp_path)
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


def test_cosine_decay_runs_from_the_peak_to_the_floor_at_the_last_step(tmp_path):
    rates = [learning_rate(s, 1.0, 4, decay="cosine", max_steps=14, min_ratio=0.1) for s in range(16)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]  # the warm-up is unchanged
    assert all(a > b for a, b in zip(rates[4:14], rates[5:15]))  # strictly falling after it
    assert rates[9] == pytest.approx(0.55) and rates[14] == rates[15] == pytest.approx(0.1)
    schedule = unet_config(tmp_path, tmp_path, "schedule.max_steps=14", "schedule.warmup_steps=4",
                           "schedule.lr_decay=cosine", "schedule.min_lr_ratio=0.1").schedule
    assert [scheduled_lr(s, 1.0, schedule) for s in range(16)] == rates
    with pytest.raises(ValueError, match="schedule.lr_decay must be one of"):
        unet_config(tmp_path, tmp_path, "schedule.lr_decay=linear")


def test_keys_added_later_may_be_left_out_and_then_mean_what_they_meant_before(tmp_path):
    """schedule.lr_decay / min_lr_ratio and the U-Net run's loss section came after the first configs: a file
    without them is the constant-lr, plain-MSE run it always was; a saved config writes them out."""
    data = config_to_dict(unet_config(tmp_path, tmp_path))
    for section, key in (("schedule", "lr_decay"), ("schedule", "min_lr_ratio")):
        del data[section][key]
    del data["loss"]
    config = parse_config(data)
    assert config.schedule.lr_decay == "constant" and config.loss.min_snr_gamma == 0.0
    assert config_to_dict(config)["loss"] == {"min_snr_gamma": 0.0, "object_weight": 1.0}
    with pytest.raises(ValueError, match=r"missing keys \['schedule.max_steps'\]"):  # required keys stay required
        del data["schedule"]["max_steps"]
        parse_config(data)


def test_the_object_weighted_loss_needs_the_shapes_dataset_and_a_positive_weight(tmp_path):
    config = json.loads((CONFIGS / "small_unet.json").read_text())
    config["data"].update(dataset="folder", data_root=str(tmp_path))
    config["loss"]["object_weight"] = 5
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="object_weight needs dataset='shapes'"):
        load_config(path)
    config["data"]["dataset"] = "shapes"
    config["loss"]["object_weight"] = 0
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"object_weight must be > 0"):
        load_config(path)
    config["loss"]["object_weight"] = 5
    path.write_text(json.dumps(config))
    assert load_config(path).loss.object_weight == 5


def test_fused_adamw_takes_the_same_steps_as_the_reference_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ours = build_optimizer("adamw", model.named_parameters(), 1e-2, (0.9, 0.99), 0.1)
    assert ours.defaults["fused"]
    plain = torch.optim.AdamW([{"params": [reference[0], reference[4]], "weight_decay": 0.1},
                               {"params": [reference[1], reference[2], reference[3], reference[5]], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.99), foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in reference]
        for p, q, g in zip(model.parameters(), reference, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        plain.step()
    for p, q in zip(model.parameters(), reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


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


def test_ema_power_sets_the_warm_up_average():
    """The warm-up (1+s)/(s+power+2): power 8 (the default) is the long-standing (1+s)/(10+s); power 0 averages every
    weight seen, the initial one included, equally; a larger power weights the recent steps more."""
    assert ema_decay_at(99, 0.9995) == pytest.approx(100 / 109) == ema_decay_at(99, 0.9995, 8.0)
    assert ema_decay_at(17990, 0.9995, 8.0) == pytest.approx(0.9995)  # where the docstring says the cap is reached
    model = torch.nn.Linear(1, 1, bias=False)
    seen = [model.weight.detach().clone()]
    averages = {power: EMA(model, decay=0.999999, power=power) for power in (0.0, 8.0)}
    generator = torch.Generator().manual_seed(0)
    for step in range(50):
        with torch.no_grad():
            model.weight.copy_(torch.randn(1, 1, generator=generator) + step / 10)  # weights drift upwards
        seen.append(model.weight.detach().clone())
        for ema in averages.values():
            ema.update(model, step)
    mean = torch.stack(seen).mean(0)
    assert torch.allclose(averages[0.0].state_dict()["weight"], mean, atol=1e-6)
    assert averages[8.0].state_dict()["weight"] > mean + 1.0  # the recent, larger weights dominate
    with pytest.raises(ValueError, match="ema.power"):
        EMAConfig(decay=0.999, power=-1.0)
    assert EMAConfig(decay=0.999).power == 8.0  # configs written before the key load unchanged


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
