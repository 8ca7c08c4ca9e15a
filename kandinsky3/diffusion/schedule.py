"""Noise schedule, forward process and timestep lists (docs/architecture.md §5.1, §5.2, §5.5–§5.8;
docs/practice.md §6.6).

Everything here is a pure builder: no state, no randomness, no device globals.

Conventions
-----------
* ``alphas_cumprod`` is the fp32 table ᾱ of shape (T,), T = 1000, indexed by the integer timestep t ∈ [0, T).
* A timestep list is a python ``list[int]``, strictly descending (the order the sampler walks it).
* The network predicts ε (architecture §5.2): x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, so x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t
  (:func:`x0_from_eps`, the one place that formula is written).

Timestep families
-----------------
* ``original_timesteps``  — the Kandinsky 3.1 list: 999 downward with stride ceil(1000/steps), stopping above 0
  (architecture §5.5); each step goes to the next entry and the last one goes to t_prev = 0.
* ``leading_timesteps``   — diffusers ``timestep_spacing="leading"`` (DDPM/DDIM); the kandinsky-community
  scheduler uses it with ``steps_offset=1`` (architecture §5.8).
* ``linspace_timesteps`` / ``trailing_timesteps`` — the other two diffusers DDPM/DDIM spacings.
* ``dpm_solver_timesteps`` — what ``DPMSolverMultistepScheduler.set_timesteps`` builds (n + 1 grid points, the
  final 0 dropped; default spacing "linspace").
* ``FLASH_TIMESTEPS``     — the fixed Kandinsky Flash list (architecture §5.7).
* ``img2img_timesteps``   — diffusers' strength truncation (practice §6.6).

The diffusers-spacing builders use numpy on purpose: they reproduce diffusers' float64 arithmetic and its
round-half-to-even so the lists are identical, not merely close.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

# Kandinsky Flash (3.1, gan=True): range(979, 0, -250) in the original (architecture §5.7).
FLASH_TIMESTEPS: tuple[int, ...] = (979, 729, 479, 229)


# --------------------------------------------------------------------------------------------------------------
# Noise schedule (architecture §5.1)
# --------------------------------------------------------------------------------------------------------------


def _cosine_alpha_bar(s: float) -> float:
    """Continuous cosine ᾱ(s) = cos²(((s + 0.008)/1.008)·π/2), s ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    # Written left to right exactly as the formula of architecture §5.1, so the float64 result is reproduced bit for
    # bit.
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> torch.Tensor:
    """(T,) fp32 betas β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta), in float64 then cast (architecture §5.1)."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    betas = [
        min(1 - _cosine_alpha_bar((i + 1) / num_train_timesteps) / _cosine_alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def cosine_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """(T,) fp32 ᾱ_t = ∏_{i≤t}(1 − β_i), the cumulative product taken in fp32.

    Bit-identical to ``diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod`` (architecture §5.1):
    ᾱ_0 = 0.999959, ᾱ_999 = 2.42873e-9.
    """
    return torch.cumprod(1.0 - cosine_betas(num_train_timesteps), dim=0)


# --------------------------------------------------------------------------------------------------------------
# Forward process and ε ↔ x₀ conversions (architecture §5.2)
# --------------------------------------------------------------------------------------------------------------


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t shaped (B, 1, …, 1) (or a 0-dim tensor for an int t), on ``like``'s device and dtype."""
    ac = alphas_cumprod.to(device=like.device, dtype=like.dtype)
    if isinstance(t, int):
        return ac[t]
    t = t.to(device=like.device, dtype=torch.long)
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be a (B,) tensor with B = {like.shape[0]}, got shape {tuple(t.shape)}")
    return ac[t].reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


def q_sample(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε for (B, C, H, W) x₀/ε and (B,) long t (or an int).

    Same arithmetic as diffusers' ``add_noise`` (schedule cast to x₀'s dtype first).
    """
    a = _gather(alphas_cumprod, t, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * eps


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂₀ = (x_t − σ_t·ε̂)/α_t with α_t = √ᾱ_t and σ_t = √(1−ᾱ_t) given (architecture §5.2).

    The one place this formula is written: every sampler and :func:`predict_x0` call it. The coefficients are
    passed, not ᾱ_t, because samplers hold them per step and DPM-Solver computes them by its own route.
    """
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_t − α_t·x̂₀)/σ_t, the inverse of :func:`x0_from_eps` (architecture §5.4 step 4)."""
    return (x_t - alpha * x0) / sigma


def predict_x0(
    x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t for (B, C, H, W) tensors and (B,) long t (or an int; architecture §5.2)."""
    a = _gather(alphas_cumprod, t, x_t)
    return x0_from_eps(x_t, eps, a**0.5, (1 - a) ** 0.5)


def predict_eps(
    x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """ε̂ = (x_t − √ᾱ_t·x̂₀)/√(1−ᾱ_t) for (B, C, H, W) tensors and (B,) long t (or an int; architecture §5.4)."""
    a = _gather(alphas_cumprod, t, x_t)
    return eps_from_x0(x_t, x0, a**0.5, (1 - a) ** 0.5)


# --------------------------------------------------------------------------------------------------------------
# Timestep lists
# --------------------------------------------------------------------------------------------------------------


def _check_steps(steps: int, num_train_timesteps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")


def original_timesteps(steps: int = 50, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Kandinsky 3.1 list ``range(T−1, 0, −(T // steps))`` read literally (architecture §5.5).

    ``-1000 // steps`` floors a negative number, so the stride is ceil(1000/steps): 50 → 999, 979, …, 19;
    25 → 999, 959, …, 39. The length is ceil(999/stride), which is smaller than ``steps`` for some values
    (37 → 36, 64 → 63, 75 → 72, 128 → 125, 1000 → 999). The matching previous timesteps are
    ``previous_timesteps(ts, last=0)``.
    """
    _check_steps(steps, num_train_timesteps)
    stride = -(-num_train_timesteps // steps)  # ceil(T / steps)
    return list(range(num_train_timesteps - 1, 0, -stride))


def original30_timesteps(steps: int = 50, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Kandinsky 3.0 labels (architecture §5.6): (S−1)·k, …, k, 0 with k = T // S — the timesteps the U-Net is
    told while the 3.0 sampler walks its own S-point cosine grid (50 → 980, 960, …, 20, 0)."""
    _check_steps(steps, num_train_timesteps)
    scale = num_train_timesteps // steps
    return [i * scale for i in reversed(range(steps))]


def previous_timesteps(timesteps: Sequence[int], last: int = 0) -> list[int]:
    """The t_prev of each step: the next entry, and ``last`` after the final one (0 for the 3.1 sampler)."""
    return [int(t) for t in list(timesteps)[1:]] + [last]


def leading_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, offset: int = 1) -> list[int]:
    """diffusers "leading" spacing: t_k = k·(T // steps) + offset, descending (architecture §5.8).

    25 steps → 961, 921, …, 41, 1; 50 → 981, …, 21, 1; 5 → 801, 601, 401, 201, 1. ``offset`` is diffusers'
    ``steps_offset`` (1 in the kandinsky-community config, 0 in the DDIM/DDPM class defaults).
    """
    _check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps // steps
    ts = [k * ratio + offset for k in reversed(range(steps))]
    if offset < 0 or ts[0] >= num_train_timesteps:
        raise ValueError(
            f"offset={offset} with steps={steps} gives timesteps outside [0, {num_train_timesteps}) (first = {ts[0]})"
        )
    return ts


def linspace_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers DDPM/DDIM "linspace" spacing: round(linspace(0, T−1, steps)) descending (ends at 0)."""
    _check_steps(steps, num_train_timesteps)
    return [int(t) for t in np.linspace(0, num_train_timesteps - 1, steps).round()[::-1].astype(np.int64)]


def trailing_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers "trailing" spacing: round(arange(T, 0, −T/steps)) − 1 (starts at T−1)."""
    _check_steps(steps, num_train_timesteps)
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1
    return [int(t) for t in ts]


def dpm_solver_timesteps(
    steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, spacing: str = "linspace", offset: int = 0
) -> list[int]:
    """The list ``DPMSolverMultistepScheduler.set_timesteps(steps)`` builds (default ``lambda_min_clipped=-inf``).

    Its grid has steps + 1 points and drops the final one (the solver's last step goes to σ = 0 instead):
    "linspace" → round(linspace(0, T−1, steps+1)) descending without the trailing 0 (e.g. 10 → 999, 899, …, 500,
    …, 100); "leading" → the leading list for steps + 1 without its last entry; "trailing" → as for DDIM.
    """
    _check_steps(steps, num_train_timesteps)
    if spacing == "linspace":
        grid = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1]
        return [int(t) for t in grid.astype(np.int64)]
    if spacing == "leading":
        ratio = num_train_timesteps // (steps + 1)
        ts = [k * ratio + offset for k in reversed(range(1, steps + 1))]
        if offset < 0 or ts[0] >= num_train_timesteps:
            raise ValueError(
                f"offset={offset} with steps={steps} gives a first timestep {ts[0]} >= {num_train_timesteps}"
            )
        return ts
    if spacing == "trailing":
        return trailing_timesteps(steps, num_train_timesteps)
    raise ValueError(f"spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def img2img_timesteps(timesteps: Sequence[int], strength: float) -> list[int]:
    """Keep the last min(int(n·strength), n) entries of an n-step list (diffusers img2img, practice §6.6).

    Defaults (leading, n = 25, strength 0.3) keep 7 steps 241, 201, …, 1; strength 0.75 keeps 18 steps from 681.
    The start latent is ``q_sample(x0, noise, first kept t)``. Raises ValueError when no step would remain.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    timesteps = [int(t) for t in timesteps]
    n = len(timesteps)
    keep = min(int(n * strength), n)
    if keep == 0:
        raise ValueError(f"strength={strength} with {n} steps keeps int({n}·{strength}) = 0 steps; raise either")
    return timesteps[n - keep :]


def check_timesteps(timesteps: Sequence[int] | torch.Tensor, num_train_timesteps: int) -> list[int]:
    """Validate a timestep list (non-empty, strictly descending, inside [0, T)) and return it as ``list[int]``."""
    if isinstance(timesteps, torch.Tensor):
        if timesteps.ndim != 1:
            raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
        timesteps = timesteps.tolist()
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {ts[0]} … {ts[-1]}")
    return ts
