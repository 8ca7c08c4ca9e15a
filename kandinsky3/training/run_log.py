"""The run folder and what a run writes as it goes: ``config.json``, ``train.log`` and the metrics of ``log.csv``.

A run starts only in a folder that holds no earlier run, and resumes only from one that has a checkpoint
(:func:`check_run_folder`), so nothing a run wrote is replaced by another by mistake. Only rank 0 logs at INFO
level and writes files; other ranks log warnings only. Metrics are summed as detached tensors between log lines
and turned into numbers (a device sync) only when a line is written.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path

import torch

from ..errors import UsageError
from ..weights.native import check_destination
from .checkpoint import CHECKPOINT, replace_file
from .config import TrainConfig, save_config

logger = logging.getLogger(__name__)

__all__ = ["RUN_CONFIG", "RUN_LOG", "EXPORT", "RUN_OUTPUTS", "setup_logging", "check_run_folder", "prepare_out_dir",
           "due", "TrainingLog"]

RUN_CONFIG = "config.json"
RUN_LOG = "log.csv"
EXPORT = "final"  # the model folder written at the end of a run
RUN_OUTPUTS = (CHECKPOINT, RUN_LOG, EXPORT, "samples")  # what marks a folder as holding a run


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
        handlers.append(_RunLogFile(out_dir / "train.log", delay=True))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._kandinsky3_training = True  # so a second run in the same process replaces them
        root.addHandler(handler)
    root.propagate = False


class _RunLogFile(logging.FileHandler):
    """``train.log``, opened (its folder made) at the first record: a run refused before it logs leaves nothing."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def check_run_folder(out_dir: Path, resume: bool) -> None:
    """Raise a one-line UsageError unless a run may start (``resume`` False) or continue (True) in ``out_dir``.

    A new run needs a folder holding none of :data:`RUN_OUTPUTS` (other files are left alone); a resumed one needs
    ``checkpoint.pt``, and a ``final/`` there must be a model folder the end of the run may replace. The trainers
    call it first, on every process, before the processes meet and before anything is written.
    """
    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if not resume and found:
        raise UsageError(f"{out_dir} holds a previous run ({', '.join(found)}); pass --resume (resume=True) to "
                         f"continue it, or set run.out_dir to another folder")
    if resume and CHECKPOINT not in found:
        fix = ("remove it or set run.out_dir to another folder to start again" if found
               else "leave out --resume to start a new run there")
        raise UsageError(f"--resume: {out_dir} holds no {CHECKPOINT} to continue from; {fix}")
    if resume:
        check_destination(out_dir / EXPORT, overwrite=True)


def prepare_out_dir(config: TrainConfig, is_main: bool) -> Path:
    """Create ``run.out_dir``, write the run config beside the checkpoints (atomically) and log it (rank 0)."""
    out_dir = Path(config.run.out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        replace_file(out_dir / RUN_CONFIG, lambda tmp: save_config(config, tmp))
        logger.info("run config (%s):\n%s", out_dir / RUN_CONFIG, (out_dir / RUN_CONFIG).read_text().strip())
    return out_dir


def due(step: int, interval: int) -> bool:
    """Whether something done every ``interval`` optimizer steps (0 = never) is due after ``step`` steps."""
    return interval > 0 and step % interval == 0


class TrainingLog:
    """Metrics of the steps since the last line, written every ``interval`` steps as one log line and one row
    of ``path`` (CSV, columns ``step`` + ``fields``; rank 0 only). On resume, rows after the resumed step are
    dropped, so the file reads as if the run had never stopped."""

    def __init__(self, path: Path, fields: list[str], interval: int, resume_step: int, write: bool):
        self.path, self.fields, self.interval, self.write = path, ["step", *fields], interval, write
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.tick = time.perf_counter()
        if write:
            keep: list[dict[str, str]] = []
            if path.is_file():
                with path.open(newline="") as handle:
                    keep = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]

            def write_rows(tmp: Path) -> None:
                with tmp.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, self.fields, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(keep)

            replace_file(path, write_rows)

    def add(self, **values: torch.Tensor | None) -> None:
        """Sum scalar tensors into the next line's averages (None values are skipped)."""
        for key, value in values.items():
            if value is None:
                continue
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def due(self, step: int) -> bool:
        return due(step, self.interval)

    def line(self, step: int, **values: float) -> None:
        """Average the summed metrics (every rank, so each starts the next line afresh) and, on rank 0, log them
        with ``values`` (e.g. lr) and the time per step since the last line."""
        now = time.perf_counter()
        averages = {key: float(total) / self.counts[key] for key, total in self.sums.items()}
        self.sums, self.counts = {}, {}
        if self.write:
            averages.update(values, ms_per_step=1000.0 * (now - self.tick) / self.interval)
            logger.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in averages.items()))
            with self.path.open("a", newline="") as handle:
                csv.DictWriter(handle, self.fields, extrasaction="ignore").writerow({"step": step, **averages})
        self.tick = time.perf_counter()
