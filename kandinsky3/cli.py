"""Command-line entry point ``kandinsky3`` (``pyproject.toml``: ``kandinsky3 = "kandinsky3.cli:main"``).

Each subcommand is two functions: ``add_<name>_parser(subparsers)`` declares its flags and ``run_<name>(args)``
calls the Python API. The CLI only parses arguments, calls library functions and prints.

    kandinsky3 generate "prompt" -o out.png [--model tiny|PATH|REPO] [--negative-prompt ...] [--steps N] ...
    kandinsky3 inpaint "prompt" --image in.png --mask mask.png -o out.png [...]
    kandinsky3 img2img "prompt" --image in.png -o out.png [--strength 0.3] [...]
    kandinsky3 convert SRC DST [--variant base|flash|inpainting] [--dtype fp16|bf16|fp32] [--components ...]
    kandinsky3 train CONFIG.json [--resume] [--stage K] [section.key=value ...]
    kandinsky3 eval [--model tiny] [--num-prompts 200] [--inpainting]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from kandinsky3.components import COMPONENTS, DTYPE_NAMES
from kandinsky3.diffusion import get_sampler, sampler_names

__all__ = ["main", "build_parser"]

SAMPLER_CHOICES = sampler_names()  # the samplers of the base and inpainting weights; "flash" comes with --flash
_SAMPLER_SUMMARIES = "; ".join(f"{name}: {get_sampler(name).summary}" for name in SAMPLER_CHOICES)
_DEFAULT_STEPS = ", ".join(f"{name} {get_sampler(name).default_steps}" for name in SAMPLER_CHOICES)
_DEFAULT_ETA = ", ".join(f"{name} {get_sampler(name).eta}" for name in SAMPLER_CHOICES
                         if get_sampler(name).eta is not None)


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
        "--dtype", choices=DTYPE_NAMES, default=None,
        help="storage dtype of floating tensors (unset: keep the source dtype; T5's wo stays fp32 under fp16)",
    )
    parser.add_argument(
        "--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS), help="components to convert",
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


def _generation_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A generate/inpaint/img2img subcommand with the flags they share."""
    from kandinsky3.pipelines import DEFAULT_MODEL

    parser = subparsers.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompt", help="text prompt")
    parser.add_argument("-o", "--output", default="out.png",
                        help="output image; with several images, _0, _1, ... are added before the suffix")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'tiny' (the bundled small model), a local checkpoint folder in any layout, or a Hub repo id")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"sampler steps; None = the model's (with its sampler), else the sampler's own "
                             f"({_DEFAULT_STEPS})")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="w in (w+1)·ε_cond − w·ε_uncond; None = the model's default")
    parser.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES,
                        help=f"sampler ({_SAMPLER_SUMMARIES}); None = the model's, else 'original' for ai-forever "
                             "weights, 'ddpm' for diffusers weights")
    parser.add_argument("--eta", type=float, default=None,
                        help=f"noise of the samplers that take it; None = {_DEFAULT_ETA}")
    parser.add_argument("--seed", type=int, default=0, help="random seed (image i uses seed + i)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--device", default="auto",
                        help="torch device, e.g. cpu, cuda, cuda:1; auto = CUDA when present")
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                        help="storage dtype of all networks; None = chosen for the device and the free memory "
                             "(logged in one line)")
    parser.add_argument("--compute-dtype", default=None, choices=DTYPE_NAMES,
                        help="keep the weights in --dtype but compute in this dtype (e.g. --dtype bf16 "
                             "--compute-dtype fp32: half the memory, fp32 speed on CPUs without fast bf16); "
                             "None = the fastest on the device")
    parser.add_argument("--stream-t5", default="auto", choices=("auto", "yes", "no"),
                        help="run the T5 encoder block by block from its files (~1 GB instead of 17 GB); auto = when "
                             "it would not fit")
    parser.add_argument("--offload", default="auto", choices=("auto", "no", "device", "disk"),
                        help="device: components wait on the CPU and visit --device only while they run; disk: the "
                             "U-Net and MoVQ are read from the files when their phase starts and dropped after it "
                             "(the least memory); auto = disk when the model would not fit in memory")
    parser.add_argument("--decode-tile", type=int, default=None, metavar="N",
                        help="decode in overlapping N×N latent tiles (N = 64: 512 px tiles), bounding the decoder's "
                             "memory for large images; results differ slightly from whole-image decoding")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _pipeline(task: str, args: argparse.Namespace):
    """The ``task`` pipeline the flags describe (:func:`kandinsky3.load_pipeline`)."""
    from kandinsky3.pipelines import DecodeTiling, LoadOptions, load_pipeline

    options = LoadOptions(
        dtype=args.dtype, compute_dtype=args.compute_dtype,
        stream_t5={"auto": None, "yes": True, "no": False}[args.stream_t5],
        offload={"auto": None, "no": False, "device": True, "disk": "disk"}[args.offload],
    )
    pipe = load_pipeline(task, args.model, device=args.device, options=options)
    if args.decode_tile is not None:
        pipe.decode_tiling = DecodeTiling(args.decode_tile, overlap=args.decode_tile // 4)
    return pipe


def _call_kwargs(args: argparse.Namespace) -> dict:
    """The call arguments shared by the three tasks; None leaves the choice to the pipeline and the model."""
    return dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                sampler=args.sampler, eta=args.eta, seed=args.seed, num_images_per_prompt=args.num_images,
                progress=not args.no_progress)


def _save_images(images, output: str, start: float) -> int:
    from pathlib import Path

    path = Path(output)
    paths = [path] if len(images) == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(images))]
    for image, target in zip(images, paths):
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - start:.1f} s")
    return 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = _generation_parser(subparsers, "generate", "text-to-image")
    parser.add_argument("--width", type=int, default=None,
                        help="image width, a multiple of 64; None = the model's own")
    parser.add_argument("--height", type=int, default=None,
                        help="image height, a multiple of 64; None = the model's own")
    parser.add_argument("--flash", action="store_true", help="Kandinsky Flash weights: 4 steps, no guidance")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    pipe = _pipeline("flash" if args.flash else "text-to-image", args)
    images = pipe(args.prompt, width=args.width, height=args.height, **_call_kwargs(args))
    return _save_images(images, args.output, start)


def add_inpaint_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = _generation_parser(subparsers, "inpaint", "repaint the masked region of an image")
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--mask", required=True, help="mask image of the same size: white (255) = repaint")
    parser.add_argument("--no-paste-back", action="store_true", help="do not copy the kept pixels from the input")
    parser.set_defaults(run=run_inpaint)


def run_inpaint(args: argparse.Namespace) -> int:
    from PIL import Image

    start = time.perf_counter()
    image, mask = Image.open(args.image), Image.open(args.mask)
    pipe = _pipeline("inpainting", args)
    images = pipe(args.prompt, image, mask, paste_back=not args.no_paste_back, **_call_kwargs(args))
    return _save_images(images, args.output, start)


def add_img2img_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = _generation_parser(subparsers, "img2img", "transform an image following a prompt")
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--strength", type=float, default=0.3, help="share of the timesteps that is run, in (0, 1]")
    parser.set_defaults(run=run_img2img)


def run_img2img(args: argparse.Namespace) -> int:
    from PIL import Image

    start = time.perf_counter()
    pipe = _pipeline("img2img", args)
    images = pipe(args.prompt, Image.open(args.image), strength=args.strength, **_call_kwargs(args))
    return _save_images(images, args.output, start)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="prompt-adherence report of a model trained on the synthetic shapes domain",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="tiny", help="'tiny' or a native/original checkpoint folder")
    parser.add_argument("--num-prompts", type=int, default=200, help="prompts per split (seen, held-out)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps; None = the sampler's own")
    parser.add_argument("--sampler", default="original", choices=SAMPLER_CHOICES,
                        help="sampler")
    parser.add_argument("--guidance-scale", type=float, default=None, help="w; None = the model's default")
    parser.add_argument("--inpainting", action="store_true", help="also evaluate the inpainting variant")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import json

    from kandinsky3 import report
    from kandinsky3.pipelines import LoadOptions, load_pipeline

    start = time.perf_counter()
    fp32 = LoadOptions(dtype="fp32")  # the report's figures are fp32 figures on every machine
    pipe = load_pipeline("text-to-image", args.model, device="cpu", options=fp32)
    options = dict(steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale)
    results = {
        "text_to_image": report.evaluate_text_to_image(pipe, args.num_prompts, seed=args.seed, **options),
        "movq_psnr": report.movq_psnr(pipe.movq),
    }
    if args.inpainting:
        inpaint = load_pipeline("inpainting", args.model, device="cpu", options=fp32)
        results["inpainting"] = report.evaluate_inpainting(inpaint, args.num_prompts, seed=args.seed, steps=args.steps)
    print(json.dumps(results, indent=2))
    print(f"evaluated in {time.perf_counter() - start:.1f} s")
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Listed for ``kandinsky3 --help`` only: :func:`main` hands ``train ...`` to the trainer's own parser
    (:mod:`kandinsky3.training.__main__`, which has flags such as --resume and --help) before this parser runs."""
    subparsers.add_parser("train", help="train a MoVQ or U-Net from a JSON config (see configs/): kandinsky3 "
                                        "train CONFIG.json [--resume] [section.key=value ...]", add_help=False)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_generate_parser, add_inpaint_parser, add_img2img_parser, add_convert_parser, add_train_parser,
    add_eval_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandinsky3", description="Kandinsky 3 text-to-image tools")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress of the libraries used too (INFO level); kandinsky3's own notes always show")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the trainer has its own parser (flags such as --resume and --help)
        from kandinsky3.training.__main__ import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    # Large CPU tensors on 2 MB pages: the per-step weight casts and activations of the 3B U-Net stop page-faulting
    # (bf16-stored U-Net step 22.5 s -> 18.0 s on 2 cores; README "Memory and speed"). Read by PyTorch at its first
    # CPU allocation, so this must run before any tensor exists; a user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("kandinsky3").setLevel(logging.INFO)  # the library's one-line notes (e.g. the placement)
    from kandinsky3.errors import UsageError
    from kandinsky3.weights import CheckpointError

    # The user's mistakes: the library's checks (UsageError, CheckpointError) and files that cannot be read or
    # written. Anything else (a TypeError, say) is a bug and keeps its traceback.
    user_errors = (UsageError, CheckpointError, FileNotFoundError, FileExistsError, IsADirectoryError,
                   NotADirectoryError, PermissionError)
    try:
        return args.run(args)
    except user_errors as error:
        print(f"kandinsky3 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
