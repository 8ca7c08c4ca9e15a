"""Command-line entry point ``kandinsky3`` (``pyproject.toml``: ``kandinsky3 = "kandinsky3.cli:main"``).

Each subcommand is two functions: ``add_<name>_parser(subparsers)`` declares its flags and ``run_<name>(args)``
calls the Python API. The CLI only parses arguments, calls library functions and prints (STYLE habit 13).

    kandinsky3 convert SRC DST [--variant base|flash|inpainting] [--dtype fp16|bf16|fp32] [--components ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]


def add_convert_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an original (3.0/3.1) or diffusers checkpoint to the native layout, tensor by tensor",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("src", help="checkpoint folder (original, diffusers or native layout) or Hub repo id")
    parser.add_argument("dst", help="output folder for the native layout (must not exist or be empty)")
    parser.add_argument(
        "--variant", choices=("base", "flash", "inpainting"), default=None,
        help="which original model files to convert (unset: base; native sources: the recorded variant)",
    )
    parser.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default=None,
        help="storage dtype of floating tensors (unset: keep the source dtype; T5's wo stays fp32 under fp16)",
    )
    parser.add_argument(
        "--components", nargs="+", choices=("unet", "movq", "text_encoder"),
        default=["unet", "movq", "text_encoder"], help="components to convert",
    )
    parser.add_argument("--t5-path", default=None, help="T5 folder for a 3.0 checkpoint (unset: google/flan-ul2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--head-dim", type=int, default=64, help="U-Net attention head size (original files only)")
    parser.add_argument("--groups", type=int, default=32, help="U-Net GroupNorm groups (original files only)")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from kandinsky3.weights import convert

    start = time.perf_counter()
    dst = convert(
        args.src,
        args.dst,
        variant=args.variant,
        dtype=args.dtype,
        components=tuple(args.components),
        t5_path=args.t5_path,
        overwrite=args.overwrite,
        head_dim=args.head_dim,
        groups=args.groups,
    )
    print(f"wrote {dst} ({', '.join(args.components)}) in {time.perf_counter() - start:.1f} s")
    return 0


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_convert_parser,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandinsky3", description="Kandinsky 3 text-to-image tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from kandinsky3.weights import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, FileNotFoundError, FileExistsError) as error:
        print(f"kandinsky3 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
