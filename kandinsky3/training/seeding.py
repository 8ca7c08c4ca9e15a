"""Everything random about optimizer step s, as a pure function of (seed, s).

- :func:`global_batch_indices` gives the ``batch_size`` dataset indices of step s (one seeded
  permutation per epoch), and :func:`micro_slices` cuts that global batch into the part of each
  process and accumulation micro-step;
- :func:`step_generator` gives the generator from which a trainer draws the step's noise,
  timesteps and dropout for the *whole* global batch before taking its own slice;
  :func:`sample_generator` gives one generator per global sample position (inpainting masks).

So a resumed run continues exactly (the checkpoint needs only the step), and a run on two processes
sees the same global batch and the same random draws as a run on one. No per-rank seed offset
exists: offsetting would make the result depend on the number of processes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["global_batch_indices", "micro_slices", "step_generator", "sample_generator"]

# Stream ids that keep the generators of different purposes independent.
STREAM_EPOCH, STREAM_STEP, STREAM_SAMPLE = 0, 1, 2


def _seed_of(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy SeedSequence: nearby keys give unrelated seeds)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seed_of(seed, STREAM_EPOCH, epoch))
    return torch.randperm(num_samples, generator=generator)


def global_batch_indices(seed: int, step: int, batch_size: int, num_samples: int) -> torch.Tensor:
    """(batch_size,) int64 dataset indices of optimizer step ``step``, a pure function of its arguments.

    Step s takes positions [s·B, (s+1)·B) of the endless sequence "permutation of epoch 0, then of
    epoch 1, ...", each epoch's permutation drawn from a generator seeded by (seed, epoch).
    """
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_samples, positions % num_samples
    out = torch.empty(batch_size, dtype=torch.int64)
    for epoch in epochs.unique().tolist():
        chosen = epochs == epoch
        out[chosen] = _epoch_permutation(seed, epoch, num_samples)[offsets[chosen]]
    return out


def micro_slices(batch_size: int, rank: int, world_size: int, grad_accum: int) -> list[slice]:
    """Global batch positions of each accumulation micro-step of process ``rank``.

    The global batch is cut into ``world_size`` contiguous parts (rank r takes part r), each cut
    into ``grad_accum`` contiguous micro-batches. All micro-batches have the same size, so averaging
    the per-micro-batch mean losses over micro-steps and ranks is the mean over the global batch.
    """
    if batch_size % (world_size * grad_accum):
        raise ValueError(
            f"batch_size {batch_size} is not divisible by world_size {world_size} × grad_accum {grad_accum}"
        )
    micro = batch_size // (world_size * grad_accum)
    start = rank * micro * grad_accum
    return [slice(start + m * micro, start + (m + 1) * micro) for m in range(grad_accum)]


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of optimizer step ``step``: a trainer draws the whole global batch's noise from it."""
    return torch.Generator(device).manual_seed(_seed_of(seed, STREAM_STEP, step))


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """A CPU generator for global batch position ``position`` of step ``step`` (e.g. its inpainting mask)."""
    return torch.Generator().manual_seed(_seed_of(seed, STREAM_SAMPLE, step, position))
