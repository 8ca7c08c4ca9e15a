"""Fine-tuning (kandinsky3.training.finetune) on the bundled small model: the text cache, gradient checkpointing,
the adapter file, exact resume, full fine-tuning, the two commands, and DDP (slow).

Runs are a few steps of 4 images from a folder of 64 px shapes pictures; the base is kandinsky3/assets/tiny/base.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from _tiny_training import one_thread
from safetensors.torch import load_file

from kandinsky3.conditioning import training_conditions
from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.models.unet import UNet
from kandinsky3.pipelines import LoadOptions, load_pipeline
from kandinsky3.pipelines.load import resolve_model
from kandinsky3.training.config import load_config
from kandinsky3.training.distributed import DistributedContext
from kandinsky3.training.finetune import cached_text_encoder, checkpoint_blocks, finetune, finetune_config
from kandinsky3.weights import load_text_encoder, load_unet, open_checkpoint

pytest.importorskip("peft")

_single_thread = pytest.fixture(autouse=True)(one_thread)
CPU = DistributedContext(0, 0, 1, torch.device("cpu"))
REPO = Path(__file__).resolve().parents[2]


def image_folder(folder: Path, count: int = 8) -> Path:
    """``count`` shapes pictures (64 px) with captions.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset, lines = ShapesDataset(count, image_size=64, seed=3), []
    for index in range(count):
        image, caption, _ = dataset.example(index)
        image.save(folder / f"{index}.png")
        lines.append(json.dumps({"file": f"{index}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def config_for(tmp_path: Path, *overrides: str, rank: int = 4, steps: int = 3):
    data = image_folder(tmp_path / "data")
    return finetune_config("tiny", str(data), str(tmp_path / "out.safetensors"), run_dir=str(tmp_path / "run"),
                           rank=rank, steps=steps, lr=1e-3, batch_size=4, device="cpu", checkpoint_interval=0,
                           overrides=("schedule.warmup_steps=1", "run.log_interval=1", *overrides))


def test_cached_text_encoder_conditions_equal_those_of_the_full_encoder(tmp_path):
    """The trainer's conditioning from cached T5 states equals the one from T5 itself (fp32; the states of a
    prompt encoded in another batch differ by float rounding only)."""
    config = config_for(tmp_path)
    prompts = ["a red circle", "a large blue square on the left against a black background", "a green triangle"]
    checkpoint = open_checkpoint(resolve_model("tiny"))
    cached = cached_text_encoder(config, CPU, checkpoint, prompts)
    full = load_text_encoder(checkpoint, dtype=torch.float32)
    ids, mask = full.tokenize(prompts[:2])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        for a, b in zip(training_conditions(cached, ids, mask, drop), training_conditions(full, ids, mask, drop)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in cached.parameters())


def test_gradient_checkpointing_keeps_the_gradients():
    unet = load_unet(resolve_model("tiny"), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 5, 128, generator=generator)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def gradients(model: UNet) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(x, torch.tensor([3, 700]), context, mask).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients(unet)
    assert checkpoint_blocks(unet) == 16 + 6  # 2 triples per level and path, self-attention on 3 levels
    for name, grad in gradients(unet).items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-8, msg=name)


def test_finetune_writes_a_lora_that_the_pipeline_loads(tmp_path):
    config = config_for(tmp_path, "run.sample_interval=3", "samples.steps=2", "model.gradient_checkpointing=true")
    path = finetune(config)
    assert path == tmp_path / "out.safetensors"
    run = tmp_path / "run"
    assert (run / "samples" / "step_000003.png").is_file() and (run / "checkpoint.pt").is_file()
    assert len((run / "log.csv").read_text().splitlines()) == 1 + 3
    pipe = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(dtype="fp32"))
    call = dict(steps=3, seed=0, output_type="pt", progress=False)
    base = pipe("a red circle", **call)
    pipe.load_lora(path)
    assert not torch.equal(pipe("a red circle", **call), base)


def test_resume_continues_exactly(tmp_path):
    straight = finetune(config_for(tmp_path / "a", steps=3))
    finetune(config_for(tmp_path / "b", steps=2))
    resumed = finetune(config_for(tmp_path / "b", steps=3), resume=True)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_finetune_refuses_a_folder_holding_another_run(tmp_path):
    config = config_for(tmp_path)
    Path(config.run.out_dir).mkdir(parents=True)
    (Path(config.run.out_dir) / "log.csv").write_text("step\n")
    with pytest.raises(ValueError, match="holds a previous run"):
        finetune(config)


def test_full_finetuning_exports_a_model_folder(tmp_path):
    config = config_for(tmp_path, f"lora.output={tmp_path / 'model'}", rank=0, steps=1)
    folder = finetune(config)
    pipe = load_pipeline("text-to-image", str(folder), device="cpu", options=LoadOptions(dtype="fp32"))
    base = load_unet(resolve_model("tiny"), dtype=torch.float32).state_dict()
    changed = [key for key, value in pipe.unet.state_dict().items() if not torch.equal(value, base[key])]
    assert changed and pipe.sampling_defaults.width == 128


def test_config_refuses_full_finetuning_of_half_precision_weights(tmp_path):
    with pytest.raises(ValueError, match="full fine-tuning"):
        config_for(tmp_path, "model.dtype=bf16", rank=0)


def test_finetune_command_writes_the_lora(tmp_path):
    from kandinsky3.cli import main

    data = image_folder(tmp_path / "data")
    out = tmp_path / "cli.safetensors"
    status = main(["finetune", "--model", "tiny", "--data", str(data), "--out", str(out), "--rank", "2",
                   "--steps", "2", "--batch-size", "2", "--device", "cpu", "--trigger", "sks",
                   "--set", "schedule.warmup_steps=1"])
    assert status == 0 and out.is_file() and (tmp_path / "cli.safetensors.run" / "config.json").is_file()


def test_train_command_runs_the_shipped_lora_config(tmp_path):
    from kandinsky3.training import main

    data = image_folder(tmp_path / "data")
    config = REPO / "configs" / "lora_tiny.json"
    overrides = [f"run.out_dir={tmp_path / 'run'}", f"data.data_root={data}", "schedule.max_steps=1",
                 "schedule.batch_size=2", "run.sample_interval=0", f"lora.output={tmp_path / 'x.safetensors'}"]
    assert load_config(config, overrides).trainer == "finetune"
    assert main([str(config), *overrides]) == 0
    assert (tmp_path / "x.safetensors").is_file()


# ------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    finetune(config)


@pytest.mark.slow
def test_two_gloo_processes_train_the_one_process_adapter(tmp_path):
    """The same global batch on 2 gloo ranks (spawned, not forked) gives the 1-process adapter to 1e-5: the runs
    differ only in the order the DDP all-reduce sums the two half-batch gradients (3 AdamW steps)."""
    one = finetune(config_for(tmp_path / "one", "lora.targets=[\"attention\",\"text_projection\"]"))
    two_config = config_for(tmp_path / "two", "lora.targets=[\"attention\",\"text_projection\"]")
    torch.multiprocessing.start_processes(_worker, args=(2, _free_port(), two_config), nprocs=2,
                                          start_method="spawn")
    a, b = load_file(str(one)), load_file(str(two_config.lora.output))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < max(float(b[k].abs().max()) for k in b) and worst <= 1e-5, worst


@pytest.mark.slow
def test_full_finetuning_sharded_on_two_processes_with_resume_equals_one_process(tmp_path):
    """FSDP2 over 2 gloo ranks (rank 0, every U-Net weight): 2 steps, stop, resume, 1 step == 3 steps on one
    process (weights, EMA and optimizer state, gathered into the checkpoints, to 1e-5); a LoRA run refuses it."""
    from test_training_distributed import compare, run_ranks

    # lr 5e-5: Adam's step is ~lr wherever a gradient is tiny, so the ranks' different summation order shows in
    # those weights at up to ~0.1 × lr (measured on the bundled model: 2e-5 at lr 1e-3, 1.1e-5 at lr 1e-4)
    full = ["model.gradient_checkpointing=true", "ema.decay=0.9", "optim.lr=0.00005"]
    finetune(config_for(tmp_path / "one", *full, f"lora.output={tmp_path / 'one_model'}", rank=0, steps=3))
    sharded = [*full, "run.fsdp=true", f"lora.output={tmp_path / 'two_model'}"]
    run_ranks(finetune, config_for(tmp_path / "two", *sharded, rank=0, steps=2))
    run_ranks(finetune, config_for(tmp_path / "two", *sharded, rank=0, steps=3), resume=True)
    compare(tmp_path / "one" / "run", tmp_path / "two" / "run")
    assert (tmp_path / "two_model" / "unet" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="run.fsdp shards full fine-tuning"):
        config_for(tmp_path / "three", "run.fsdp=true", rank=4)
