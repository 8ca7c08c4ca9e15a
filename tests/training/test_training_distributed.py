"""Two gloo processes (torchrun, CPU) train to the same weights as one process with the same global batch.

The global batch, its split into per-rank slices and every random draw are functions of (seed, step)
only (kandinsky3.training.seeding), and each sample's text context does not depend on its batch, so the
two runs differ only by floating-point summation order (the DDP gradient all-reduce sums two
half-batch means instead of one full-batch mean): 1e-5 bounds that after 3 AdamW steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_training import MOVQ, max_difference, movq_config, movq_dir, one_thread, unet_config

from kandinsky3.training.checkpoint import CHECKPOINT, load_checkpoint
from kandinsky3.training.config import config_to_dict
from kandinsky3.training.seeding import global_batch_indices, micro_slices
from kandinsky3.training.train_movq import train_movq
from kandinsky3.training.train_unet import train_unet

_single_thread = pytest.fixture(autouse=True)(one_thread)

TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(config: dict, path: Path, *args: str, processes: int = 2) -> None:
    """``torchrun --nproc_per_node=2 -m kandinsky3.training CONFIG`` on 127.0.0.1 and a free port."""
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "kandinsky3.training", str(path),
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _worker(rank: int, world_size: int, port: int, trainer, config, resume: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer(config, resume=resume)


def run_ranks(trainer, config, resume: bool = False, processes: int = 2) -> None:
    """Run ``trainer(config)`` on ``processes`` gloo ranks started from this process (the torchrun environment
    variables set by hand). Spawned, not forked: a child forked from a process whose OpenMP pool has run (earlier
    tests) can deadlock in its first parallel region."""
    torch.multiprocessing.start_processes(_worker, args=(processes, _free_port(), trainer, config, resume),
                                          nprocs=processes, start_method="spawn")


def _in_order(optimizer: dict) -> list:
    """Optimizer states in parameter order (plain state dicts key them by index, FSDP ones by name)."""
    return [optimizer["state"][p] for group in optimizer["param_groups"] for p in group["params"]]


def compare(one: Path, two: Path) -> None:
    a, b = load_checkpoint(one / CHECKPOINT), load_checkpoint(two / CHECKPOINT)
    assert a["step"] == b["step"]
    keys = [k for k in ("model", "ema", "extra") if k in a]
    worst, where = max_difference({**{k: a[k] for k in keys}, "optimizer": _in_order(a["optimizer"])},
                                  {**{k: b[k] for k in keys}, "optimizer": _in_order(b["optimizer"])})
    assert worst <= TOLERANCE, (where, worst)


def test_rank_slices_partition_the_global_batch():
    """Each global batch is a permutation slice; rank parts and micro-batches tile it exactly."""
    indices = global_batch_indices(seed=3, step=5, batch_size=12, num_samples=7)
    assert torch.equal(indices, global_batch_indices(seed=3, step=5, batch_size=12, num_samples=7))
    positions = [p for rank in range(2) for part in micro_slices(12, rank, 2, 3) for p in range(part.start, part.stop)]
    assert positions == list(range(12))
    epoch0 = torch.cat([global_batch_indices(0, s, 7, 7) for s in range(1)])
    assert sorted(epoch0.tolist()) == list(range(7))  # one epoch = one permutation
    with pytest.raises(ValueError, match="divisible"):
        micro_slices(10, 0, 2, 3)


@pytest.mark.slow  # spawns processes / re-reads checkpoints: CI's second tier
def test_two_process_unet_run_equals_one_process_run(tmp_path):
    """Base U-Net with a trained T5: 2 ranks × 2 micro-batches of 2 == 1 rank × 2 micro-batches of 4.
    Launched exactly as documented: torchrun -m kandinsky3.training CONFIG.json."""
    movq = movq_dir(tmp_path / "movq")
    fields = ["schedule.max_steps=3", "schedule.batch_size=8", "schedule.grad_accum=2", "run.num_threads=1"]
    train_unet(unet_config(tmp_path / "one", movq, *fields))
    two = unet_config(tmp_path / "two", movq, *fields)
    torchrun(config_to_dict(two), tmp_path / "two.json")
    compare(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # spawns processes / re-reads checkpoints: CI's second tier
def test_two_process_movq_run_equals_one_process_run(tmp_path):
    """MoVQ with an EMA codebook updated from the gathered global batch, dead-code restarts and the
    patch discriminator with the adaptive weight (grad accumulation 1, so both runs compute the adaptive
    weight on the same samples). lr 1e-4: the attention key biases have an exactly zero true gradient, and
    Adam turns their ~1e-10 rounding noise into steps of about lr/100, so lr 1e-3 would put those
    parameters (only) at ~1e-5 apart."""
    model = type(MOVQ).from_dict({**MOVQ.to_dict(), "codebook_size": 16, "codebook_ema": True,
                                  "codebook_restart_after": 1})
    fields = ["schedule.batch_size=8", "schedule.grad_accum=1", "schedule.max_steps=3", "schedule.warmup_steps=0",
              "optim.lr=1e-4", "run.num_threads=1"]
    train_movq(movq_config(tmp_path / "one", model, *fields))
    run_ranks(train_movq, movq_config(tmp_path / "two", model, *fields))
    compare(tmp_path / "one", tmp_path / "two")
