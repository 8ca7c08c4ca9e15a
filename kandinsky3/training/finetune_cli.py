"""The ``kandinsky3 finetune`` command: a LoRA (or, with --full, every U-Net weight) from a folder of your images.

    kandinsky3 finetune --model tiny --data my_images/ --out my_lora.safetensors [--rank 16] [--steps 1000] ...
    torchrun --standalone --nproc_per_node=2 -m kandinsky3.cli finetune --model ai-forever/Kandinsky3.1 ...

The flags build a run config (:func:`kandinsky3.training.finetune.finetune_config`; ``--set section.key=value``
reaches any other field) and :func:`kandinsky3.training.finetune.finetune` runs it; the run's files (config.json,
train.log, caches, checkpoint.pt, samples/) go to ``--run-dir``, by default ``<--out>.run``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["add_finetune_parser", "run_finetune"]


def _bucket(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit():
        raise argparse.ArgumentTypeError(f"a bucket is HEIGHTxWIDTH in pixels, e.g. 768x1024; got {text!r}")
    return int(height), int(width)


def add_finetune_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..lora import TARGET_GROUPS
    from ..pipelines.load import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "finetune", help="train a LoRA (or with --full every U-Net weight) on a folder of your images",
        description="Fine-tune an existing model on a folder of your images: a LoRA file (default) or, with --full, "
                    "a model folder. Run files go to --run-dir. Several GPUs: torchrun --standalone "
                    "--nproc_per_node=N -m kandinsky3.cli finetune ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the base: 'tiny', a checkpoint folder or a Hub repo id")
    parser.add_argument("--data", required=True, help="folder of images with captions.jsonl or captions.csv "
                                                      "(columns/keys 'file' and 'caption')")
    parser.add_argument("--out", required=True,
                        help="the LoRA file to write (.safetensors); with --full a model folder")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (the update is scaled by alpha/rank); "
                                                                  "None = the rank")
    parser.add_argument("--targets", nargs="+", default=["attention"], choices=list(TARGET_GROUPS),
                        help="layers that get adapters: U-Net attention projections, residual-block convolutions, "
                             "the text projection")
    parser.add_argument("--full", action="store_true", help="train every U-Net weight instead of a LoRA (DreamBooth-"
                                                            "style; needs fp32 weights and optimizer state)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (after 50 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step, over all processes")
    parser.add_argument("--resolution", type=int, default=None,
                        help="square training size in pixels (center crops); None = the model's own size")
    parser.add_argument("--buckets", nargs="+", type=_bucket, default=[], metavar="HxW",
                        help="aspect-ratio buckets instead of square crops: each step crops to one of them")
    parser.add_argument("--trigger", nargs="+", default=[], help="trigger words, recorded in the file")
    parser.add_argument("--sample-prompt", action="append", default=[],
                        help="prompt of the sample grids (repeatable); none = the first 4 captions")
    parser.add_argument("--sample-every", type=int, default=0, help="steps between sample grids; 0 = never")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0 = at the end)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute U-Net blocks in the backward pass (less GPU memory, ~30%% slower)")
    parser.add_argument("--run-dir", default="", help="run files (checkpoint, caches, samples); '' = <--out>.run")
    parser.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CUDA when present")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter's initial weights and every draw")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other run-config field (kandinsky3.training.config.FinetuneConfig), e.g. "
                             "schedule.grad_accum=4 ema.decay=0.999")
    parser.set_defaults(run=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from ..errors import validating
    from .finetune import finetune, finetune_config
    from .run_log import setup_logging

    with validating():
        config = finetune_config(
            args.model, args.data, args.out, run_dir=args.run_dir, rank=0 if args.full else args.rank,
            alpha=args.alpha, targets=tuple(args.targets), steps=args.steps, lr=args.lr, batch_size=args.batch_size,
            resolution=args.resolution, buckets=tuple(args.buckets), trigger_words=tuple(args.trigger),
            sample_prompts=tuple(args.sample_prompt), sample_interval=args.sample_every,
            checkpoint_interval=args.checkpoint_every, gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed, device=args.device, overrides=tuple(args.set))
    is_main = int(os.environ.get("RANK", 0)) == 0
    setup_logging(is_main, Path(config.run.out_dir))
    output = finetune(config, resume=args.resume)
    if is_main:
        print(f"wrote {output}")
    return 0
