"""Pieces both trainers share: logging setup, autocast, checkpoints with RNG states, the CSV log.

A checkpoint (``<out_dir>/checkpoint.pt``, written atomically) is one dict::

    step          optimizer steps done (the next step to run)
    config        the run config as a dict
    model         state dict of the unwrapped trained module(s) (full tensors)
    ema           EMA tensors by parameter name (absent when ema_decay = 0)
    optimizer     optimizer state dict (and ``scaler`` for fp16)
    rng           torch CPU / CUDA RNG states and the data-order description {"seed", "step"}
    extra         trainer-specific entries (discriminator, its optimizer)

The trainers draw every random number of step s from generators seeded by (seed, s) (see
:mod:`.data`), so the step alone fixes the data order and the noise; the global torch RNG states
are saved and restored as well, for anything that uses the global generator (e.g. dropout).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, save_config

logger = logging.getLogger(__name__)

__all__ = [
    "setup_logging",
    "prepare_out_dir",
    "autocast",
    "make_grad_scaler",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "CSVLog",
    "Metrics",
    "set_lr",
    "save_image_grid",
    "warn_config_changes",
]

CHECKPOINT = "checkpoint.pt"
RUN_CONFIG = "config.json"


def setup_logging(is_main: bool, out_dir: Path | None = None) -> None:
    """Entry-point logging: rank 0 logs INFO to stderr and ``out_dir/train.log``; other ranks warnings only."""
    root = logging.getLogger("kandinsky3")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for handler in list(root.handlers):
        if getattr(handler, "_kandinsky3_training", False):
            root.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._kandinsky3_training = True  # so a second run in the same process replaces them
        root.addHandler(handler)
    root.propagate = False


def prepare_out_dir(config: TrainConfig, is_main: bool) -> Path:
    """Create ``out_dir``, write the run config beside the checkpoints and log it (rank 0)."""
    out_dir = Path(config.out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / RUN_CONFIG)
        logger.info("run config (%s):\n%s", out_dir / RUN_CONFIG, (out_dir / RUN_CONFIG).read_text().strip())
    return out_dir


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for "bf16" / "fp16" (fp16 needs CUDA); a no-op context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler that is active only for fp16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def rng_state(seed: int, step: int) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "data": {"seed": seed, "step": step}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: an interrupted save never leaves a broken file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    logger.info("saved checkpoint %s (step %d)", path, state["step"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def warn_config_changes(saved: dict, current: dict) -> None:
    """Log (warning) every key whose value differs between a checkpoint's config and the current one."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        logger.warning("resuming with a changed config: %s",
                       ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class CSVLog:
    """Append rows of metrics to ``path`` (rank 0). On resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None = None):
        self.path, self.fields = path, ["step", *fields]
        keep: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as handle:
                keep = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(keep)

    def write(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.fields, extrasaction="ignore").writerow({"step": step, **values})


class Metrics:
    """Sums of detached scalar tensors between log lines; ``.item()`` runs only in :meth:`averages`."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def averages(self) -> dict[str, float]:
        out = {key: float(total) / self.counts[key] for key, total in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


def save_image_grid(images: torch.Tensor, columns: int, path: Path) -> None:
    """Write (N,3,H,W) images in [-1,1] as one PNG, ``columns`` images per row."""
    from PIL import Image

    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.zeros(3, rows * h, columns * w, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
