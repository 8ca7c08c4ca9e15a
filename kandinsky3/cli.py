"""Command-line entry point ``kandinsky3`` (``pyproject.toml``: ``kandinsky3 = "kandinsky3.cli:main"``).

Each subcommand is two functions: ``add_<name>_parser(subparsers)`` declares its flags and ``run_<name>(args)``
calls the Python API. The CLI only parses arguments, calls library functions and prints.

    kandinsky3 generate "prompt" ["prompt" ...] [--prompts FILE] -o out.png [--model tiny|PATH|REPO] [--seed S] ...
    kandinsky3 inpaint "prompt" --image in.png --mask mask.png -o out.png [...]
    kandinsky3 img2img "prompt" --image in.png -o out.png [--strength 0.3] [...]
    kandinsky3 convert SRC DST [--variant base|flash|inpainting] [--dtype fp16|bf16|fp32] [--components ...]
    kandinsky3 train CONFIG.json [--resume] [--stage K] [section.key=value ...]
    kandinsky3 finetune --model MODEL --data DIR --out FILE.safetensors [--rank 16] [--steps N] [--lr ...] [...]
    kandinsky3 eval [--model tiny|PATH] [--num-prompts 200] [--inpainting [MODEL]] [--prompt-seed S]

Every image is a PNG carrying its generation parameters (AUTOMATIC1111's "parameters" text, :mod:`kandinsky3.png_info`),
written atomically and never over an existing file without ``--overwrite``. Everything that can be checked is checked
before a model loads. Exit status (:mod:`kandinsky3.command`): 0 done; 2 a usage mistake, said in one line on stderr;
1 any other failure, said in one line that names a log file holding the traceback (``-v``/``--debug`` prints it);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kandinsky3 import command
from kandinsky3.components import COMPONENTS, DTYPE_NAMES
from kandinsky3.diffusion import get_sampler, sampler_names

if TYPE_CHECKING:
    from kandinsky3.pipelines import GenerationRequest

__all__ = ["main", "build_parser"]

SAMPLER_CHOICES = sampler_names()  # the samplers of the base and inpainting weights; "flash" comes with --flash
_SAMPLER_SUMMARIES = "; ".join(f"{name}: {get_sampler(name).summary}" for name in SAMPLER_CHOICES)
_DEFAULT_STEPS = ", ".join(f"{name} {get_sampler(name).default_steps}" for name in SAMPLER_CHOICES)
_DEFAULT_ETA = ", ".join(f"{name} {get_sampler(name).eta}" for name in SAMPLER_CHOICES
                         if get_sampler(name).eta is not None)
_SIZE_HELP = ("a multiple of the model's size step (MoVQ × U-Net downsampling: 64 for the released models and the "
              "bundled tiny one)")
_SEED_RANGE = 2**32  # random seeds are drawn from [0, 2**32), as AUTOMATIC1111 does
_SAME_MODEL = "same"  # ``eval --inpainting`` without MODEL: --model's own inpainting weights


def add_convert_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = _subparser(
        subparsers, "convert",
        "convert an original (3.0/3.1) or diffusers checkpoint to the native layout, tensor by tensor",
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
        "--components", nargs="+", choices=COMPONENTS, default=None,
        help="components to convert (unset: all three; native sources: those the folder holds)",
    )
    parser.add_argument("--t5-path", default=None, help="T5 folder for a 3.0 checkpoint (unset: google/flan-ul2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--head-dim", type=int, default=64, help="U-Net attention head size (original files only)")
    parser.add_argument("--groups", type=int, default=32, help="U-Net GroupNorm groups (original files only)")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from kandinsky3.weights import convert, open_checkpoint

    start = time.perf_counter()
    dst = convert(
        args.src,
        args.dst,
        variant=args.variant,
        dtype=args.dtype,
        components=tuple(args.components) if args.components else None,
        t5_path=args.t5_path,
        overwrite=args.overwrite,
        head_dim=args.head_dim,
        groups=args.groups,
    )
    written = open_checkpoint(dst).manifest["components"]
    print(f"wrote {dst} ({', '.join(written)}) in {time.perf_counter() - start:.1f} s")
    return 0


# ------------------------------------------------------------------------------------------ generation


def _generation_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A generate/inpaint/img2img subcommand with the flags they share."""
    from kandinsky3.pipelines import DEFAULT_MODEL

    parser = _subparser(subparsers, name, help)
    parser.add_argument("prompt", nargs="*", help="text prompt(s); each gives --num-images images")
    parser.add_argument("--prompts", metavar="FILE", default=None,
                        help="more prompts, one per line ('-': standard input); a line that starts with '{' is a "
                             "JSON object with \"prompt\" and any of " + ", ".join(_LINE_KEYS["common"]) + " (and "
                             "width/height for generate, strength for img2img) overriding the flags for that prompt")
    parser.add_argument("-o", "--output", default="out.png",
                        help="output PNG; with several images, _0, _1, ... (_00, _01, ... from 11 on) are added "
                             "before the suffix")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'tiny' (the bundled small model), a local checkpoint folder in any layout, "
                             "or a Hub repo id")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--steps", "--num-inference-steps", type=int, default=None,
                        help=f"sampler steps; None = the model's (with its sampler), else the sampler's own "
                             f"({_DEFAULT_STEPS})")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="w in (w+1)·ε_cond − w·ε_uncond; None = the model's default")
    parser.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES,
                        help=f"sampler ({_SAMPLER_SUMMARIES}); None = the model's, else 'original' for ai-forever "
                             "weights, 'ddpm' for diffusers weights")
    parser.add_argument("--eta", type=float, default=None,
                        help=f"noise of the samplers that take it; None = {_DEFAULT_ETA}")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed: image i of the run uses seed + i, and each PNG records its own; None or "
                             "-1 = drawn at random and printed")
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
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="load a LoRA file made for this model, at SCALE (default 1); repeatable")
    return parser


# Per-prompt options a JSON line of --prompts may set (the flag names with underscores), per task.
_LINE_KEYS = {
    "common": ("negative_prompt", "seed", "steps", "guidance_scale", "sampler", "eta", "num_images"),
    "text-to-image": ("width", "height"),
    "flash": ("width", "height"),
    "img2img": ("strength",),
    "inpainting": (),
}


@dataclass(frozen=True)
class Job:
    """One checked pipeline call (:func:`~kandinsky3.pipelines.check_generation`) and its images' output paths."""

    request: GenerationRequest
    outputs: list[Path]


def _flag_arguments(task: str, args: argparse.Namespace, inputs: dict) -> dict:
    """The call arguments the flags give (None: the model's or the pipeline's choice) and the input images."""
    arguments = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                     sampler=args.sampler, eta=args.eta, num_images_per_prompt=args.num_images,
                     progress=not args.no_progress, **inputs)
    if task in ("text-to-image", "flash"):
        arguments.update(width=args.width, height=args.height)
    if task == "img2img":
        arguments["strength"] = args.strength
    return arguments


def _read_prompts(path: str, task: str) -> list[tuple[str, dict, str]]:
    """(prompt, its arguments, "FILE:LINE") of each non-blank line of a prompts file (JSON lines start with '{')."""
    allowed = set(_LINE_KEYS["common"] + _LINE_KEYS[task])
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise _usage(f"--prompts {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            entries.append((line.strip(), {}, where))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _usage(f"{where}: not a JSON object ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise _usage(f"{where}: a JSON line needs a \"prompt\" string")
        unknown = sorted(set(record) - allowed - {"prompt"})
        if unknown:
            raise _usage(f"{where}: unknown keys {unknown}; a line may set {sorted(allowed)}")
        if "num_images" in record:
            record["num_images_per_prompt"] = record.pop("num_images")
        entries.append((record.pop("prompt"), record, where))
    return entries


def _plan_jobs(task: str, args: argparse.Namespace, facts, inputs: dict, output: Path, base: int) -> list[Job]:
    """Every call of the run, checked against the model: image k (counted over the run) has seed base + k unless
    its --prompts line sets one; its output is numbered when the run makes several images."""
    from kandinsky3.errors import UsageError
    from kandinsky3.pipelines import check_generation

    entries = [(prompt, {}, None) for prompt in args.prompt]
    if args.prompts is not None:
        entries += _read_prompts(args.prompts, task)
    if not entries:
        raise _usage("no prompt: give one or more prompts, or --prompts FILE")
    flags, requests = _flag_arguments(task, args, inputs), []
    for prompt, options, where in entries:
        arguments = {**flags, **options, "prompt": prompt}
        if _is_random(arguments.get("seed")):
            arguments["seed"] = base + sum(request.num_images for request in requests)
        try:
            requests.append(check_generation(task, facts, **arguments))
        except UsageError as error:
            if where is None:
                raise
            raise _usage(f"{where}: {error}") from error
    paths = _numbered(output, sum(request.num_images for request in requests), args.overwrite)
    jobs, done = [], 0
    for request in requests:
        jobs.append(Job(request, paths[done:done + request.num_images]))
        done += request.num_images
    return jobs


def _is_random(seed: int | None) -> bool:
    return seed is None or seed == -1  # -1: AUTOMATIC1111's "random"


def _check_output(output: Path) -> Path:
    """``-o``: a .png name in an existing folder this process can write in."""
    if output.suffix.lower() != ".png":
        raise _usage(f"-o {output}: the output must be a .png file (the images are PNGs carrying their parameters)")
    folder = output.parent
    if not folder.is_dir():
        raise _usage(f"-o {output}: the folder {folder} does not exist" if not folder.exists() else
                     f"-o {output}: {folder} is not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise _usage(f"-o {output}: cannot write in {folder} ({error.strerror or error})") from None
    return output


def _numbered(output: Path, count: int, overwrite: bool) -> list[Path]:
    """``output`` for one image, else output_0.png ... (zero-padded to one width); none may exist unless
    ``overwrite``, none may be a folder."""
    digits = len(str(count - 1))
    paths = [output] if count == 1 else [output.with_name(f"{output.stem}_{i:0{digits}d}{output.suffix}")
                                         for i in range(count)]
    folders = [str(path) for path in paths if path.is_dir()]
    if folders:
        raise _usage(f"-o {output}: {folders[0]} is a folder")
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise _usage(f"{shown} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite to replace, or "
                     "choose another -o")
    return paths


def _open_image(path: str, flag: str):
    """The image at ``path``, read whole now (a missing or unreadable file is refused before the model loads)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except UnidentifiedImageError:
        raise _usage(f"{flag} {path}: not an image file PIL can read") from None
    except (FileNotFoundError, IsADirectoryError):
        raise _usage(f"{flag} {path}: no such file") from None


def _input_images(task: str, args: argparse.Namespace) -> dict:
    """img2img's image, inpainting's image, mask and paste-back flag, as call arguments."""
    if task == "img2img":
        return dict(image=_open_image(args.image, "--image"))
    if task == "inpainting":
        return dict(image=_open_image(args.image, "--image"), mask=_open_image(args.mask, "--mask"),
                    paste_back=not args.no_paste_back)
    return {}


def _check_loras(options: Sequence[str]) -> None:
    """--lora FILE[:SCALE]: each file exists and each scale is finite, before the model loads (a file's contents
    are checked against the model when it is loaded)."""
    from kandinsky3.lora import parse_lora_option

    for option in options:
        path, scale = parse_lora_option(option)
        if not Path(path).is_file():
            raise _usage(f"--lora {option}: no such file {path}")
        if not math.isfinite(scale):
            raise _usage(f"--lora {option}: the scale must be a finite number, got {scale}")


def _load_options(args: argparse.Namespace):
    from kandinsky3.pipelines import LoadOptions

    return LoadOptions(
        dtype=args.dtype, compute_dtype=args.compute_dtype,
        stream_t5={"auto": None, "yes": True, "no": False}[args.stream_t5],
        offload={"auto": None, "no": False, "device": True, "disk": "disk"}[args.offload],
    )


def _pipeline(task: str, args: argparse.Namespace):
    """The ``task`` pipeline the flags describe (:func:`kandinsky3.load_pipeline`)."""
    from kandinsky3.pipelines import load_pipeline

    pipe = load_pipeline(task, args.model, device=args.device, options=_load_options(args))
    for option in args.lora:
        from kandinsky3.lora import parse_lora_option

        pipe.load_lora(*parse_lora_option(option))
    return pipe


def _parameters(request: GenerationRequest, index: int, image, model: str) -> str:
    """The PNG "parameters" text of image ``index`` of a checked call: the values that ran."""
    from kandinsky3 import __version__
    from kandinsky3.png_info import format_parameters

    negatives = request.batch.negatives
    return format_parameters(
        request.batch.prompts[index], negatives[index] if negatives else None, steps=request.steps,
        sampler=request.sampler, guidance_scale=request.guidance_scale, seed=request.seed + index, width=image.width,
        height=image.height, model=model, eta=request.eta, denoising_strength=request.strength,
        version=f"kandinsky3 {__version__}")


def _generate(task: str, args: argparse.Namespace) -> int:
    """Check everything against the model's configs, load it, run the calls, write each call's images as it ends."""
    from kandinsky3.pipelines import DecodeTiling, model_facts
    from kandinsky3.png_info import save_png

    start = time.perf_counter()
    output = _check_output(Path(args.output))
    inputs = _input_images(task, args)
    _check_loras(args.lora)
    tiling = None if args.decode_tile is None else DecodeTiling(args.decode_tile, overlap=args.decode_tile // 4)
    facts = model_facts(args.model, task, _load_options(args), device=args.device)  # configs and headers only
    if tiling is not None:
        facts = dataclasses.replace(facts, decode_tile=tiling.tile)
    base = random.SystemRandom().randrange(_SEED_RANGE) if _is_random(args.seed) else args.seed
    jobs = _plan_jobs(task, args, facts, inputs, output, base)
    if _is_random(args.seed):
        print(f"seed {base} (drawn at random; --seed {base} repeats this run)", flush=True)
    pipe = _pipeline(task, args)
    pipe.decode_tiling = tiling
    written = 0
    for job in jobs:
        for index, (image, path) in enumerate(zip(pipe.generate(job.request), job.outputs)):
            save_png(image, path, _parameters(job.request, index, image, args.model), overwrite=args.overwrite)
            print(f"wrote {path} (seed {job.request.seed + index})", flush=True)
            written += 1
    print(f"{written} image{'s' if written > 1 else ''} in {time.perf_counter() - start:.1f} s")
    return 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = _generation_parser(subparsers, "generate", "text-to-image")
    parser.add_argument("--width", type=int, default=None, help=f"image width, {_SIZE_HELP}; None = the model's own")
    parser.add_argument("--height", type=int, default=None,
                        help=f"image height, {_SIZE_HELP}; None = the model's own")
    parser.add_argument("--flash", action="store_true",
                        help="Kandinsky Flash weights: 4 fixed steps, no guidance (refuses --steps, --eta, "
                             "--guidance-scale, --negative-prompt and --sampler)")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    return _generate("flash" if args.flash else "text-to-image", args)


def add_inpaint_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = _generation_parser(subparsers, "inpaint", "repaint the masked region of an image")
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--mask", required=True, help="mask image of the same size: white (255) = repaint")
    parser.add_argument("--no-paste-back", action="store_true", help="do not copy the kept pixels from the input")
    parser.set_defaults(run=run_inpaint)


def run_inpaint(args: argparse.Namespace) -> int:
    return _generate("inpainting", args)


def add_img2img_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = _generation_parser(subparsers, "img2img", "transform an image following a prompt")
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--strength", type=float, default=0.3, help="share of the timesteps that is run, in (0, 1]")
    parser.set_defaults(run=run_img2img)


def run_img2img(args: argparse.Namespace) -> int:
    return _generate("img2img", args)


# ------------------------------------------------------------------------------------------ eval and train


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = _subparser(subparsers, "eval", "prompt-adherence report of a model trained on the synthetic shapes domain")
    parser.add_argument("--model", default="tiny", help="'tiny' or a checkpoint folder; a folder holding an inpainting "
                                                           "model gets the inpainting report alone")
    parser.add_argument("--num-prompts", type=int, default=200, help="prompts per split (seen, held-out)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps; None = the sampler's own")
    parser.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES, help="sampler; None = the model's default")
    parser.add_argument("--guidance-scale", type=float, default=None, help="w; None = the model's default")
    parser.add_argument("--inpainting", nargs="?", const=_SAME_MODEL, default=None, metavar="MODEL",
                        help="also evaluate an inpainting model: MODEL, or without it --model's own inpainting "
                             "weights (tiny's, or an original-layout folder's)")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--prompt-seed", type=int, default=None,
                        help="which evaluation prompts; None = the model card's (1234 for text-to-image, 2024 for "
                             "inpainting); tune settings on another seed than the one you report")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(run=run_eval)


def _eval_models(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(text-to-image model, inpainting model) that ``kandinsky3 eval`` evaluates, None for a report it skips; each
    is opened (headers only) here, so a wrong folder is refused before minutes of the other report."""
    from kandinsky3.pipelines.load import resolve_model
    from kandinsky3.weights import open_checkpoint

    text_model = args.model
    inpainting_model = args.model if args.inpainting == _SAME_MODEL else args.inpainting
    if open_checkpoint(resolve_model(args.model)).variant == "inpainting":
        if args.inpainting not in (None, _SAME_MODEL):
            raise _usage(f"--model {args.model} is an inpainting model; --inpainting MODEL goes with a "
                         "text-to-image --model")
        text_model, inpainting_model = None, args.model
    if inpainting_model is not None:
        open_checkpoint(resolve_model(inpainting_model, "inpainting"), variant="inpainting")
    return text_model, inpainting_model


def run_eval(args: argparse.Namespace) -> int:
    from kandinsky3 import evaluation
    from kandinsky3.pipelines import LoadOptions, load_pipeline

    start = time.perf_counter()
    if args.num_prompts < 1:
        raise _usage(f"--num-prompts must be at least 1, got {args.num_prompts}")
    text_model, inpainting_model = _eval_models(args)
    fp32 = LoadOptions(dtype="fp32")  # the report's figures are fp32 figures on every machine
    options = dict(steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                   seed=args.seed, progress=not args.no_progress)
    prompts = {} if args.prompt_seed is None else {"prompt_seed": args.prompt_seed}
    results = {}
    if text_model is not None:
        pipe = load_pipeline("text-to-image", text_model, device="cpu", options=fp32)
        results["text_to_image"] = evaluation.evaluate_text_to_image(pipe, args.num_prompts, **prompts, **options)
        results["movq_psnr"] = evaluation.movq_psnr(pipe.movq)
    if inpainting_model is not None:
        inpaint = load_pipeline("inpainting", inpainting_model, device="cpu", options=fp32)
        report = evaluation.evaluate_inpainting(inpaint, args.num_prompts, **prompts, **options)
        raw = report.pop("before_paste_back")
        results["inpainting"], results["inpainting_before_paste_back"] = report, raw
        results.setdefault("movq_psnr", evaluation.movq_psnr(inpaint.movq))
    print(json.dumps(results, indent=2))
    print(f"evaluated in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Listed for ``kandinsky3 --help`` only: :func:`main` hands ``train ...`` to the trainer's own parser
    (:mod:`kandinsky3.training.__main__`, which has flags such as --resume and --help) before this parser runs."""
    subparsers.add_parser("train", help="train a MoVQ or U-Net from a JSON config (see configs/): kandinsky3 "
                                        "train CONFIG.json [--resume] [section.key=value ...]", add_help=False)


def add_finetune_parser(subparsers: argparse._SubParsersAction) -> None:
    """``kandinsky3 finetune``: its flags and run function live in :mod:`kandinsky3.training.finetune_cli`."""
    from kandinsky3.training.finetune_cli import add_finetune_parser as add

    add(subparsers)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """``kandinsky3 serve``: its flags and run function live in :mod:`kandinsky3.serve.cli`."""
    from kandinsky3.serve.cli import add_parser

    add_parser(subparsers)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_generate_parser, add_inpaint_parser, add_img2img_parser, add_convert_parser, add_train_parser,
    add_finetune_parser, add_eval_parser, add_serve_parser,
)


# ------------------------------------------------------------------------------------------ the command


def _add_verbose_flag(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", "--debug", dest="verbose", action="store_true", default=default,
                        help="log the libraries' progress too (INFO level) and print the traceback of an error")


def _subparser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_verbose_flag(parser, argparse.SUPPRESS)  # also after the subcommand; SUPPRESS keeps a -v given before it
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandinsky3", description="Kandinsky 3 text-to-image tools")
    _add_verbose_flag(parser, False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def _usage(message: str) -> Exception:
    from kandinsky3.errors import UsageError

    return UsageError(message)


def _train(argv: list[str]) -> int:
    from kandinsky3.training.__main__ import main as train_main

    return train_main(argv)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line other than ``train``. Prompts may stand on both sides of flags (``generate "a red circle"
    --seed 1 "a blue square"``), which argparse alone refuses; any other leftover gets argparse's usual error and
    status 2. (The trainer's parser uses ``parse_intermixed_args``, which does not take subcommands, so not here.)"""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, "prompt", None), list) and not any(e.startswith("-") for e in extras):
        args.prompt += extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose_flags = {"-v", "--verbose", "--debug"}
    if next((a for a in argv if a not in verbose_flags), None) == "train":  # the trainer has its own parser
        rest = [a for a in argv if a not in verbose_flags]
        rest.remove("train")
        command.set_threads()
        return command.guarded("train", lambda: _train(rest), argv, verbose=any(a in verbose_flags for a in argv))
    args = parse_args(argv)
    # Large CPU tensors on 2 MB pages: the per-step weight casts and activations of the 3B U-Net stop page-faulting
    # (bf16-stored U-Net step 22.5 s -> 18.0 s on 2 cores; README "Memory and speed"). Read by PyTorch at its first
    # CPU allocation, so this must run before any tensor exists; a user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("kandinsky3").setLevel(logging.INFO)  # the library's one-line notes (e.g. the placement)
    command.set_threads()
    return command.guarded(args.command, lambda: args.run(args), argv, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
