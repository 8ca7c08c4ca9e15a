"""``kandinsky3 train CONFIG.json [--resume] [--stage N] [key=value ...]`` and ``python -m kandinsky3.training``.

The config's ``run`` key picks the trainer: "movq" (:mod:`.train_movq`), "unet"
(:mod:`.train_unet`) or "recipe" (U-Net stages in order). Multi-process launches use torchrun;
the commands are in :mod:`kandinsky3.training.distributed`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kandinsky3 train", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("config", help="run config JSON (configs/*.json)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=2000 unet.model_channels=64")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt if it exists")
    parser.add_argument("--stage", type=int, default=None,
                        help="recipes only: run this stage (0-based) instead of all stages in order")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up logging and threads, run the trainer(s). Returns the exit status."""
    from .config import config_from_dict, apply_overrides, recipe_stages
    from .loop import setup_logging

    args = build_parser().parse_args(argv)
    data = json.loads(Path(args.config).read_text())
    if data.get("run") == "recipe":
        configs = recipe_stages(data, args.overrides)
        if args.stage is not None:
            configs = [configs[args.stage]]
    else:
        if args.stage is not None:
            raise SystemExit("--stage is for recipes (run='recipe') only")
        configs = [config_from_dict(apply_overrides(data, args.overrides))]
    is_main = int(os.environ.get("RANK", 0)) == 0
    for config in configs:
        setup_logging(is_main, Path(config.out_dir))
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        if config.run == "movq":
            from .train_movq import train_movq

            train_movq(config, resume=args.resume)
        else:
            from .train_unet import train_unet

            train_unet(config, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
