"""One prepared GPU check: this package against diffusers on random full-size Kandinsky 3.1 weights.

    python benchmarks/device_check.py [--size 1024] [--steps 20] [--weights DIR]   # CUDA; DIR is kept and reused
    python benchmarks/device_check.py --tiny   # CPU: tiny random weights, 64 px, 2 steps (the test's run)

Writes random weights (``full_size_weights.random_tensor``, stored in fp16: ~30 GB) in the original 3.1 layout:
``weights/kandinsky3{,_inpainting}.pt``, ``movq.pt``, ``flan_ul2_encoder/`` (T5 as one ``model.safetensors``, the
tokenizer, ``projection{,_inpainting}.pt``). Each row builds a pipeline, runs a 2-step warm-up and one timed call:
ours through ``get_T2I_pipeline`` / ``get_inpainting_pipeline(device, dtype_map=dtype, model=folder)``, diffusers'
``Kandinsky3Pipeline`` (and ``Kandinsky3Img2ImgPipeline`` at strength 1 beside our inpainting: diffusers has no
Kandinsky 3 inpainting) built in memory from the same files through the package's key maps, or skipped with a
note when diffusers is not installed. Columns: load s; s/step (first to last step callback, per step); total s
of the timed call (encode, denoise, decode); peak GiB (``torch.cuda.max_memory_allocated`` over the timed call:
weights + activations; "-" on the CPU). A failing row prints its error and the table goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import itertools
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from full_size_weights import FLAN_UL2_ENCODER, MOVQ, meta_layout, random_tensor, write_random, write_tokenizer
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kandinsky3.models.movq import MoVQ  # noqa: E402
from kandinsky3.models.unet import UNet, UNetConfig  # noqa: E402
from kandinsky3.pipelines import get_inpainting_pipeline, get_T2I_pipeline  # noqa: E402
from kandinsky3.weights.diffusers import movq_config_from_diffusers  # noqa: E402
from kandinsky3.weights.movq_keys import original_to_diffusers_movq  # noqa: E402
from kandinsky3.weights.original import ENCODER_FOLDER, projection_file_name, unet_file_name  # noqa: E402
from kandinsky3.weights.unet_keys import original_to_diffusers_unet  # noqa: E402

PROMPT = "a red cat sitting on a chair"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ROWS = (("text-to-image", "fp16"), ("text-to-image", "bf16"), ("inpainting", "fp16"))
STORED = torch.float16  # dtype of the written tensors


@dataclasses.dataclass(frozen=True)
class Spec:
    """Architecture as diffusers kwargs (Kandinsky3UNet, VQModel) and T5Config kwargs; ours is derived."""

    unet: dict
    movq: dict
    t5: dict


FULL = Spec({}, MOVQ, FLAN_UL2_ENCODER)  # Kandinsky3UNet() defaults are the released 3.0/3.1 U-Net
# Released head size (64), group counts (32) and MoVQ factor (8): the original-layout reader infers these configs
# from shapes alone, and diffusers' text-to-image pipeline assumes the factor 8.
TINY = Spec(
    dict(time_embedding_dim=64, groups=32, attention_head_dim=64, layers_per_block=2, block_out_channels=(128, 256),
         cross_attention_dim=64, encoder_hid_dim=32),
    {**MOVQ, "block_out_channels": [32, 32, 32, 64], "layers_per_block": 1, "num_vq_embeddings": 12},
    {**FLAN_UL2_ENCODER, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 128},
)


def random_state(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, shape, STORED, generator) for name, shape in layout.items()}


def write_original(root: Path, spec: Spec) -> None:
    """Random weights in the original 3.1 folder layout (base and inpainting U-Nets, MoVQ, T5, projections)."""
    from transformers import T5Config, T5EncoderModel

    weights = root / "weights"
    encoder = weights / ENCODER_FOLDER
    shutil.rmtree(weights, ignore_errors=True)  # what a run cut short left
    weights.mkdir(parents=True)
    write_tokenizer(weights)  # -> weights/tokenizer/, which becomes the encoder folder
    (weights / "tokenizer").rename(encoder)
    config = T5Config(**spec.t5)
    config.save_pretrained(str(encoder))
    with torch.device("meta"):
        t5 = T5EncoderModel(config)
    write_random(encoder / "model.safetensors", meta_layout(t5, drop=("encoder.embed_tokens.weight",)), STORED, 10)
    unet_config = UNetConfig.from_diffusers(spec.unet)
    projection = {"0.weight": (unet_config.context_dim, config.d_model), "1.weight": (unet_config.context_dim,),
                  "1.bias": (unet_config.context_dim,)}
    with torch.device("meta"):
        layouts = [meta_layout(UNet(dataclasses.replace(unet_config, num_channels=n))) for n in (4, 9)]
    base = random_state(layouts[0], 20)
    # the inpainting U-Net shares the base's random tensors except the 9-channel input layer (saves 3B draws)
    unets = {"base": base, "inpainting": {**base, **random_state(
        {key: shape for key, shape in layouts[1].items() if shape != tuple(base[key].shape)}, 21)}}
    for seed, (variant, state) in enumerate(unets.items()):
        null = random_tensor("null_embedding", (unet_config.context_dim,), STORED, torch.Generator().manual_seed(seed))
        torch.save({"unet": state, "null_embedding": null}, weights / unet_file_name(variant))
        torch.save(random_state(projection, 30 + seed), encoder / projection_file_name(variant))
    with torch.device("meta"):
        movq = MoVQ(movq_config_from_diffusers(spec.movq))
    torch.save(random_state(meta_layout(movq), 40), weights / "movq.pt")


def diffusers_pipeline(task: str, root: Path, spec: Spec, dtype: torch.dtype, device: str):
    """diffusers' Kandinsky3Pipeline (or Img2Img for the inpainting row) over the original-layout files."""
    from diffusers import DDPMScheduler, Kandinsky3Img2ImgPipeline, Kandinsky3Pipeline, Kandinsky3UNet, VQModel
    from transformers import AutoTokenizer, T5EncoderModel

    def read(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def build(cls, kwargs: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        with torch.device("meta"):
            module = cls(**kwargs)
        module.load_state_dict(state, strict=True, assign=True)
        return module.to(device, dtype).eval()

    weights, encoder = root / "weights", root / "weights" / ENCODER_FOLDER
    unet_state = original_to_diffusers_unet(read(weights / unet_file_name("base"))["unet"],
                                            read(encoder / projection_file_name("base")))
    movq_config = movq_config_from_diffusers(spec.movq)
    codebook = torch.zeros(spec.movq["num_vq_embeddings"], movq_config.z_channels)
    movq_state = original_to_diffusers_movq(read(weights / "movq.pt"), movq_config, codebook=codebook)
    cls = Kandinsky3Img2ImgPipeline if task == "inpainting" else Kandinsky3Pipeline
    pipe = cls(  # the scheduler of kandinsky-community/kandinsky-3
        tokenizer=AutoTokenizer.from_pretrained(str(encoder)),
        text_encoder=T5EncoderModel.from_pretrained(str(encoder), dtype=dtype),
        unet=build(Kandinsky3UNet, spec.unet, unet_state), movq=build(VQModel, spec.movq, movq_state),
        scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", steps_offset=1, clip_sample=True),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpainting_inputs(size: int) -> tuple[Image.Image, np.ndarray]:
    """A noise image and a centred square mask (1 = repaint)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.float32)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return Image.fromarray(pixels), mask


def caller(impl: str, task: str, size: int):
    """(pipe, steps, on_step) -> output: one generation through the pipeline's own call signature."""
    image, mask = inpainting_inputs(size)
    if impl == "ours":
        def call(pipe, steps, on_step):
            kwargs = dict(steps=steps, seed=0, progress=False, output_type="np", callback=lambda info: on_step())
            if task == "inpainting":
                return pipe(PROMPT, image, mask, **kwargs)
            return pipe(PROMPT, width=size, height=size, **kwargs)
        return call

    def call(pipe, steps, on_step):
        def hook(_pipe, _i, _t, tensors):
            on_step()
            return tensors
        kwargs = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                      callback_on_step_end=hook)
        if task == "inpainting":
            return pipe(PROMPT, image=image, strength=1.0, **kwargs)
        return pipe(PROMPT, height=size, width=size, **kwargs)
    return call


def measure(build, call, steps: int, device: str) -> dict[str, float]:
    """Build, warm up (2 steps), then time one call of ``steps`` steps."""
    cuda = device == "cuda"
    marks: list[float] = []

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    start = now()
    pipe = build()
    row = {"load": now() - start}
    call(pipe, 2, lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = now()
    call(pipe, steps, lambda: marks.append(now()))
    row["total"] = now() - start
    row["step"] = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else math.nan
    row["peak"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
    return row


def run_rows(root: Path, spec: Spec, args: argparse.Namespace, have_diffusers: bool) -> None:
    """Print the table one row at a time (a run cut short keeps the rows it finished)."""
    print("| task | dtype | impl | load s | s/step | total s | peak GiB | note |\n|---|---|---|---|---|---|---|---|")
    for (task, dtype_name), impl in itertools.product(ROWS, ("ours", "diffusers")):
        dtype, cells = DTYPES[dtype_name], ["-"] * 4
        stand_in = (impl, task) == ("diffusers", "inpainting")
        note = "img2img at strength 1 (diffusers has no K3 inpainting)" if stand_in else ""
        if impl == "ours":
            factory = get_inpainting_pipeline if task == "inpainting" else get_T2I_pipeline
            build = functools.partial(factory, args.device, dtype_map=dtype, model=root)
        else:
            build = functools.partial(diffusers_pipeline, task, root, spec, dtype, args.device)
        if impl == "diffusers" and not have_diffusers:
            note = "skipped: diffusers is not installed"
        else:
            try:
                row = measure(build, caller(impl, task, args.size), args.steps, args.device)
                cells = [f"{row[key]:.3f}" for key in ("load", "step", "total")]
                cells.append("-" if math.isnan(row["peak"]) else f"{row['peak']:.2f}")
            except Exception as error:  # noqa: BLE001 - one failing row must not lose the table
                traceback.print_exc()
                note = f"FAILED: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        print(f"| {task} | {dtype_name} | {impl} | {' | '.join(cells)} | {note} |", flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random weights on the CPU (64 px, 2 steps)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, help="timed sampler steps (default 20; 2 with --tiny)")
    parser.add_argument("--weights", type=Path, help="weights folder, kept; reused when it already holds weights")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 20)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --tiny for the CPU check")
    try:
        import diffusers
        have_diffusers, diffusers_version = True, diffusers.__version__
    except ImportError:
        have_diffusers, diffusers_version = False, "not installed (diffusers rows skipped)"
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (CPU run)"
    weights = "tiny" if args.tiny else "full-size"
    print(f"GPU: {gpu}\ntorch {torch.__version__}, diffusers {diffusers_version}\n"
          f"{weights} random weights, {args.size} px, {args.steps} timed steps", flush=True)
    spec = TINY if args.tiny else FULL
    root = args.weights or Path(tempfile.mkdtemp(prefix="k3-device-check-"))
    try:
        if not (root / "weights" / "movq.pt").is_file():
            start = time.perf_counter()
            write_original(root, spec)
            print(f"wrote {root} in {time.perf_counter() - start:.0f} s", flush=True)
        print()
        run_rows(root, spec, args, have_diffusers)
    finally:
        if args.weights is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
