"""FSDP2 (fully_shard over gloo on CPU): a 2-process sharded run, stopped and resumed, ends at the weights of a
plain 1-process run with the same global batch (tolerance as in test_training_distributed)."""

from __future__ import annotations

import pytest
import torch.distributed.checkpoint.state_dict  # noqa: F401  (imported before the ranks fork: saves seconds each)
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.tensor  # noqa: F401
from _tiny_training import movq_dir, one_thread, unet_config
from test_training_distributed import compare, run_ranks

from kandinsky3.training.train_unet import train_unet

_single_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.mark.slow  # spawns processes / re-reads checkpoints: CI's second tier
def test_two_process_fsdp_run_with_resume_equals_one_process_run(tmp_path):
    """Parameters become DTensor shards; the EMA is sharded like them; checkpoints hold gathered weights, EMA
    and optimizer state (keyed by name); the resumed run re-shards them. 2 steps + resume + 1 step == 3 steps."""
    movq = movq_dir(tmp_path / "movq")
    fields = ["schedule.batch_size=8", "schedule.grad_accum=2", "run.num_threads=1"]
    train_unet(unet_config(tmp_path / "one", movq, "schedule.max_steps=3", *fields))
    sharded = [*fields, "run.fsdp=true"]
    run_ranks(train_unet, unet_config(tmp_path / "two", movq, "schedule.max_steps=2", "run.sample_interval=2", *sharded))
    assert (tmp_path / "two" / "samples" / "step_000002.png").is_file()  # sampling runs on all ranks under FSDP
    run_ranks(train_unet, unet_config(tmp_path / "two", movq, "schedule.max_steps=3", *sharded), resume=True)
    compare(tmp_path / "one", tmp_path / "two")
