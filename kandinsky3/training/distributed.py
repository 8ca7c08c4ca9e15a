"""Process-group setup, DDP / FSDP2 wrapping and the collectives the trainers use.

Launch (every trainer; ``CONFIG.json`` is a run config, see :mod:`kandinsky3.training.config`)::

    # one process (CPU or one GPU); no torchrun needed
    kandinsky3 train configs/small_unet.json
    python -m kandinsky3.training configs/small_unet.json

    # two processes on one node (GPUs: NCCL, one GPU per process; CPU: gloo)
    torchrun --standalone --nproc_per_node=2 -m kandinsky3.training configs/small_unet.json

    # two nodes of 8 GPUs (run on each node, NODE_RANK = 0 or 1)
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 \\
        --master_addr=$MASTER_ADDR --master_port=29500 -m kandinsky3.training CONFIG.json

Conventions: rank 0 is the only process that logs and writes files. There is no per-rank seed
offset: every random draw comes from generators seeded by (seed, step) for the whole global batch
(:mod:`.seeding`), so results do not depend on the number of processes. Models are wrapped after
they are moved to the device, and the *unwrapped* module is what gets saved.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedContext",
    "setup_distributed",
    "cleanup_distributed",
    "wrap_model",
    "unsharded",
    "no_sync",
    "all_reduce_mean",
    "all_gather_cat",
    "barrier",
    "full_state_dict",
    "optimizer_state",
    "load_optimizer_state",
    "FSDP_MIN_PARAMS",
]

FSDP_MIN_PARAMS = 20_000_000  # size-based wrap policy: shard every submodule holding at least this many


class DistributedContext(NamedTuple):
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistributedContext:
    """(rank, local_rank, world_size, device) from torchrun's RANK / LOCAL_RANK / WORLD_SIZE.

    Without those variables (or WORLD_SIZE=1) this is a single process and no group is created.
    With them, the default process group is initialised: NCCL when the device is CUDA, gloo on CPU.
    ``device``: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda".
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
        logger.info("process group: rank %d of %d, backend %s", rank, world_size, dist.get_backend())
    return DistributedContext(rank, local_rank, world_size, target)


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists (call in a ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: nn.Module, ctx: DistributedContext, *, fsdp: bool = False,
               min_params: int = FSDP_MIN_PARAMS) -> nn.Module:
    """DDP (or FSDP2 with a size-based policy) around a module already on ``ctx.device``.

    Single process: the module itself. FSDP2 (``fully_shard``) shards in place every submodule that
    holds at least ``min_params`` parameters not already sharded below it, then the root; parameters
    become DTensors with unchanged names, so :class:`~.ema.EMA` and :func:`full_state_dict` work
    on the returned module directly.
    """
    if not ctx.distributed:
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for child in _size_policy(module, min_params):
            fully_shard(child, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def _size_policy(module: nn.Module, min_params: int) -> list[nn.Module]:
    """Submodules to shard, innermost first: each holds >= min_params parameters of its own (frozen ones
    included, so a frozen T5's blocks are sharded too), not counting those inside a chosen descendant."""
    chosen: list[nn.Module] = []

    def visit(node: nn.Module) -> int:
        remaining = sum(visit(child) for child in node.children())
        remaining += sum(p.numel() for p in node.parameters(recurse=False))
        if node is not module and remaining >= min_params:
            chosen.append(node)
            return 0
        return remaining

    visit(module)
    return chosen


@contextlib.contextmanager
def unsharded(model: nn.Module, sharded: bool) -> Iterator[None]:
    """Under FSDP2 (``sharded``) the root module's own parameter shards gathered for the block, for code that calls
    submodules directly (a pipeline drawing samples); child units gather themselves in their forward hooks."""
    if not sharded:
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce inside the block when ``skip`` (accumulation micro-steps).

    DDP: ``model.no_sync()``; FSDP2: ``set_requires_gradient_sync(False)``; otherwise nothing.
    """
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif skip and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (in place; the tensor itself when single-process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all processes along dim 0, in rank order."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def full_state_dict(module: nn.Module, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """State dict of an unwrapped module as full CPU tensors, without the keys in ``skip`` (FSDP2 DTensor
    shards are gathered; every rank must call this under FSDP)."""
    out = {}
    for key, value in module.state_dict().items():
        if key in skip:
            continue
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = value.detach().cpu().clone()
    return out


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """Optimizer state to save: ``optimizer.state_dict()``, or under FSDP the full (gathered) state keyed
    by parameter name (every rank must call it)."""
    if not fsdp or not (dist.is_available() and dist.is_initialized()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Inverse of :func:`optimizer_state` (under FSDP each rank keeps its shard of the full state)."""
    if not fsdp or not (dist.is_available() and dist.is_initialized()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
