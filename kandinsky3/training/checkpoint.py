"""Checkpoint files: what a resumed run needs to continue exactly, written atomically.

``<out_dir>/checkpoint.pt`` is one dict::

    step          optimizer steps done (the next step to run)
    config        the run config as a dict (config.config_to_dict)
    model         state dict of the unwrapped trained module(s) (full tensors)
    ema           EMA tensors by parameter name (absent when ema.decay = 0)
    optimizer     optimizer state dict
    scaler        GradScaler state (active for fp16 only)
    rng           torch CPU / CUDA RNG states and the data-order description {"seed", "step"}
    extra         trainer-specific entries (the MoVQ run's discriminator and its optimizer)

The trainers draw every random number of step s from generators seeded by (seed, s)
(:mod:`.seeding`), so the step alone fixes the data order and the noise; the global torch RNG
states are saved and restored as well, for anything that uses the global generator (e.g. dropout).
Models are saved unwrapped (no DDP or compile prefixes), so a checkpoint loads without repair.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TrainConfig, config_to_dict
from .distributed import barrier
from .ema import EMA

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "replace_file", "save_checkpoint", "load_checkpoint", "read_checkpoint",
           "restore_training_state"]

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(
    path: Path, *, step: int, config: TrainConfig, model: dict, optimizer: dict, scaler: torch.amp.GradScaler,
    ema: dict | None, extra: dict | None = None,
) -> None:
    """Write the checkpoint dict to ``path``: torch.save to a temporary file, then rename, so an interrupted
    save never leaves a broken file. ``model``, ``optimizer`` and ``ema`` are full state dicts."""
    state: dict[str, Any] = {"step": step, "config": config_to_dict(config), "model": model, "optimizer": optimizer,
                             "scaler": scaler.state_dict(), "rng": _rng_state(config.run.seed, step)}
    if ema is not None:
        state["ema"] = ema
    if extra is not None:
        state["extra"] = extra
    replace_file(path, lambda tmp: torch.save(state, tmp))
    logger.info("saved checkpoint %s (step %d)", path, step)


def replace_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` atomically: ``write(temporary path beside it)``, then a rename over ``path``, so an
    interruption leaves the previous file (or none), never a partial one; a failed write removes the temporary."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cached_file(path: Path, key: dict, compute: Callable[[], dict], is_main: bool) -> dict:
    """``compute()`` saved with ``key`` in ``path`` (folders created, written through :func:`replace_file`) by rank 0
    unless the file already holds that key; every rank then reads it (a shared filesystem under several nodes)."""
    if is_main and not holds_key(path, key):
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"key": key, **compute()}
        replace_file(path, lambda tmp: torch.save(state, tmp))
        logger.info("cached %s", path)
    barrier()
    return torch.load(path, weights_only=True)


def holds_key(path: Path, key: dict) -> bool:
    """Whether the cache file ``path`` exists and was written for ``key``."""
    return path.is_file() and torch.load(path, weights_only=True, mmap=True)["key"] == key


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(out_dir: Path, config: TrainConfig) -> dict[str, Any]:
    """The checkpoint of ``out_dir`` to resume from (:func:`.run_log.check_run_folder` made sure there is one).
    Every config value that differs from the checkpoint's is logged as a warning."""
    state = load_checkpoint(out_dir / CHECKPOINT)
    saved, current = _flat(state["config"]), _flat(config_to_dict(config))
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        logger.warning("resuming with a changed config: %s",
                       ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed))
    return state


def restore_training_state(state: dict[str, Any], scaler: torch.amp.GradScaler, ema: EMA | None) -> int:
    """Load the loss scaler, the EMA and the global RNG states of a checkpoint; returns the step to continue
    from. (Model and optimizer states are the trainer's: their layout depends on DDP / FSDP.)"""
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    logger.info("resumed at step %d", state["step"])
    return int(state["step"])


def _rng_state(seed: int, step: int) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "data": {"seed": seed, "step": step}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as {"section.key": value}."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {key: value for name, sub in tree.items() for key, value in _flat(sub, f"{prefix}{name}.").items()}
