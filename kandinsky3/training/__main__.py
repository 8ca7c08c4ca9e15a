"""The ``kandinsky3 train`` command, also ``python -m kandinsky3.training``::

    kandinsky3 train CONFIG.json [--resume] [--stage K] [section.key=value ...]

The config's ``trainer`` picks the trainer: "movq" (:mod:`.train_movq`), "unet" (:mod:`.train_unet`),
"text" (:mod:`.train_text`: the small model's T5, on captions alone), "finetune" (:mod:`.finetune`: LoRA or full
fine-tuning of an existing model) or "recipe" (U-Net stages in order). Multi-process launches use torchrun; the
commands are in :mod:`kandinsky3.training.distributed`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kandinsky3 train", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("config", help="run config JSON (configs/*.json)")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value overrides, e.g. schedule.max_steps=2000 model.unet.model_channels=64")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in run.out_dir from its checkpoint.pt (without it, a folder holding a "
                             "run is refused; recipes: stages not yet started start afresh)")
    parser.add_argument("--stage", type=int, default=None,
                        help="recipes only: run this stage (0-based) instead of all stages in order")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, read the config(s), set up logging and threads, run the trainer(s). Returns the exit status;
    a config that cannot be read or is invalid ends with one line on stderr and status 2."""
    from .config import FinetuneConfig, MoVQTrainConfig, TextTrainConfig, load_run_configs
    from .run_log import RUN_OUTPUTS, check_run_folder, setup_logging

    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # flags anywhere: CONFIG --resume a.b=1 as well as --resume CONFIG a.b=1
    try:
        configs = load_run_configs(args.config, args.overrides, args.stage)
    except (OSError, ValueError) as error:  # a missing file, bad JSON, unknown / missing / invalid keys
        parser.error(str(error))
    # --resume on a recipe continues the stages already started; the later ones start when reached
    resumes = [args.resume and (len(configs) == 1 or any(Path(c.run.out_dir, n).exists() for n in RUN_OUTPUTS))
               for c in configs]
    for config, resume in zip(configs, resumes):  # every run folder, before anything is written (UsageError)
        check_run_folder(Path(config.run.out_dir), resume)
    is_main = int(os.environ.get("RANK", 0)) == 0
    for config, resume in zip(configs, resumes):
        setup_logging(is_main, Path(config.run.out_dir))
        if config.run.num_threads > 0:
            torch.set_num_threads(config.run.num_threads)
        if isinstance(config, MoVQTrainConfig):
            from .train_movq import train_movq

            train_movq(config, resume=resume)
        elif isinstance(config, TextTrainConfig):
            from .train_text import train_text

            train_text(config, resume=resume)
        elif isinstance(config, FinetuneConfig):
            from .finetune import finetune

            finetune(config, resume=resume)
        else:
            from .train_unet import train_unet

            train_unet(config, resume=resume)
    return 0


if __name__ == "__main__":  # python -m kandinsky3.training (torchrun too) = kandinsky3 train: errors as one line
    from ..cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
