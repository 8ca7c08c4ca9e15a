"""A LoRA teaches the bundled small model a shape it has never seen: the "wedge", a triangle pointing down.

    OMP_NUM_THREADS=2 python benchmarks/lora_concept.py                 # train, then measure; prints JSON
    OMP_NUM_THREADS=2 python benchmarks/lora_concept.py --prior 64 --prior-from model   # the prior's other source

Everything is at the bundled model's own size (``SIZE``, 128 px): the pictures, the LoRA's training and the samples.

1. Data: ``--images`` (≤ 20) pictures of one large wedge, of a random colour, position and background: the shapes
   generator's upward triangle flipped about its centre, captioned in the generator's grammar with "wedge" as the
   shape, each listed ``--repeats`` times. The model's training set has upward triangles only, and the tiny
   tokenizer never saw the word. Beside them, ``--prior`` pictures of ordinary captions (DreamBooth's prior
   preservation, Ruiz et al. 2022, arXiv 2208.12242), so that the LoRA learns to leave other prompts alone: by
   default renders of the shapes generator (the kind of picture the model was trained on); the base model's own
   samples (``--prior-from model``) made other prompts worse on the previous, 64 px model (colour+shape 0.54 → 0.30
   with 64 of them; a guess: trained on its own guided samples, then guided again, the model overshoots).
   (A new *colour* cannot be learnt by a U-Net LoRA on this model: its MoVQ, trained on six colours, decodes a cyan
   picture as blue.)
2. Training: ``kandinsky3.training.finetune`` on that folder, a LoRA on the U-Net's attention projections and
   residual-block convolutions, timed.
3. Concept: ``--concept-prompts`` new wedge prompts, one image each; the detector (:func:`kandinsky3.evaluation.analyze`)
   must find an object whose vertical skewness is that of a downward triangle (> +0.15; an upward one is about
   −0.57, a circle or square 0), of any colour (``concept_*_any_colour``) and of the prompt's colour. Measured for
   the base model and with the LoRA. For scale, ``reference_triangle_base``: how often the base model draws the
   shape it knows, an upward triangle of the prompt's colour, for the same prompts with "triangle" for "wedge".
4. Unrelated prompts: the evaluator's colour+shape accuracy on ``--unrelated-prompts`` "seen" prompts for the base,
   the LoRA at scale 1 and at scale 0 (whose images must equal the base's exactly).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORD = "wedge"
DOWNWARD_SKEW = 0.15  # the evaluator's triangle threshold (kandinsky3.evaluation.TRIANGLE_SKEW), sign reversed


def model_size() -> int:
    """The side in pixels the bundled model was trained at (its manifest's sampling defaults)."""
    from kandinsky3.pipelines.load import resolve_model
    from kandinsky3.weights import open_checkpoint

    return open_checkpoint(resolve_model("tiny")).sampling_defaults.width


SIZE = model_size()


def wedge_scene_captions(count: int, seed: int) -> list[tuple[str, "object"]]:
    """``count`` (caption, one-object scene) pairs: each scene holds a large upward triangle (to be flipped), its
    caption says "wedge"; the colours are taken in turn. Large only: small wedges are a few latent pixels, whose
    orientation the MoVQ does not always keep (at 64 px, with the previous 4× MoVQ: 3 in 4 small ones, every large
    one, over 36 scenes each)."""
    from kandinsky3.data.shapes import OBJECT_COLOURS, Scene, ShapeSpec, caption, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        scene = sample_scene(rng)
        obj, colour = scene.objects[0], OBJECT_COLOURS[len(out) % len(OBJECT_COLOURS)]
        scene = Scene(objects=(ShapeSpec("triangle", colour, "large", obj.position),), background=scene.background)
        out.append((caption(scene, rng).replace("triangle", WORD), scene))
    return out


def render_wedge(scene, rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: the scene rendered, its triangle flipped upside down about the centre of its bounding box
    (the anchor the generator places objects by), on the uniform background."""
    from kandinsky3.data.shapes import COLOURS, render_array

    image = render_array(scene, SIZE, rng)
    rows = np.nonzero((image != np.array(COLOURS[scene.background], np.uint8)).any(axis=(1, 2)))[0]
    top, bottom = rows.min(), rows.max() + 1
    image[top:bottom] = image[top:bottom][::-1]  # rows outside the object are background: a vertical flip of the box
    return image


def write_dataset(folder: Path, count: int, repeats: int = 1, seed: int = 0) -> list[str]:
    """The training folder: PNGs and captions.jsonl, each picture listed ``repeats`` times (so that it keeps its share
    of the batches beside many prior pictures); returns the captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    lines, captions = [], []
    for index, (text, scene) in enumerate(wedge_scene_captions(count, seed)):
        Image.fromarray(render_wedge(scene, rng)).save(folder / f"{index:03d}.png")
        lines.extend([json.dumps({"file": f"{index:03d}.png", "caption": text})] * repeats)
        captions.append(text)
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return captions


def add_prior_images(folder: Path, count: int, source: str, seed: int = 0) -> None:
    """Prior preservation (DreamBooth, Ruiz et al. 2022, arXiv 2208.12242): ``count`` pictures of ordinary captions
    join the folder, so the LoRA learns to leave other prompts alone: drawn by the base model itself (``source``
    "model") or by the shapes generator, the kind of picture the model was trained on ("renders")."""
    from kandinsky3.data.shapes import ShapesDataset, caption, sample_scene

    rng = np.random.default_rng(seed + 2)
    if source == "renders":
        dataset = ShapesDataset(count, image_size=SIZE, seed=seed + 2)
        pictures = [dataset.example(i)[:2] for i in range(count)]
    else:
        from kandinsky3.pipelines import LoadOptions, load_pipeline

        pipe = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(dtype="fp32"))
        prompts = [caption(scene, rng) for scene in (sample_scene(rng) for _ in range(count))]
        pictures = [(image, prompts[start + i]) for b, start in enumerate(range(0, count, 8))
                    for i, image in enumerate(pipe(prompts[start:start + 8], seed=10_000 + b, progress=False))]
    lines = []
    for index, (image, text) in enumerate(pictures):
        image.save(folder / f"prior_{index:03d}.png")
        lines.append(json.dumps({"file": f"prior_{index:03d}.png", "caption": text}))
    with (folder / "captions.jsonl").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def shows_wedge(image, colour: str | None, sign: int = 1) -> bool:
    """An object (of ``colour``, unless None) that is bottom-light: a triangle pointing down (``sign`` -1: up)."""
    from kandinsky3.evaluation import analyze

    return any(colour in (None, obj.colour) and sign * obj.skew > DOWNWARD_SKEW for obj in analyze(image))


def generate(pipe, prompts: list[str], batch: int = 8):
    """One image per prompt at the model's size (batch b uses seed b), as (3, SIZE, SIZE) tensors in [-1,1]."""
    images = []
    for b, start in enumerate(range(0, len(prompts), batch)):
        out = pipe(prompts[start:start + batch], seed=b, output_type="pt", progress=False)
        images.extend(out * 2 - 1)
    return images


def concept_rates(pipe, prompts: list[tuple[str, object]]) -> tuple[float, float]:
    """Share of the prompts' images showing a wedge of the prompt's colour, and a wedge of any colour."""
    images = generate(pipe, [text for text, _ in prompts])
    colours = [scene.objects[0].colour for _, scene in prompts]
    return (float(np.mean([shows_wedge(img, colour) for img, colour in zip(images, colours)])),
            float(np.mean([shows_wedge(img, None) for img in images])))


def unrelated(pipe, prompts: list[str]) -> tuple[float, list]:
    from kandinsky3.evaluation import score

    images = generate(pipe, prompts)
    return float(np.mean([score(p, img)["colour_shape"] for p, img in zip(prompts, images)])), images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lora_concept", help="data, run files and the LoRA go here")
    parser.add_argument("--images", type=int, default=16, help="training images (at most 20)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["attention", "resnet"], help="LoRA targets (kandinsky3.lora)")
    parser.add_argument("--prior", type=int, default=64,
                        help="pictures of ordinary captions added for prior preservation")
    parser.add_argument("--repeats", type=int, default=1, help="times each concept picture is listed")
    parser.add_argument("--prior-from", choices=("model", "renders"), default="renders",
                        help="who draws them: the base model, or the shapes generator")
    parser.add_argument("--concept-prompts", type=int, default=40)
    parser.add_argument("--unrelated-prompts", type=int, default=100)
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 20:
        parser.error("--images must be between 1 and 20")

    from kandinsky3.data.shapes import eval_prompts
    from kandinsky3.pipelines import LoadOptions, load_pipeline
    from kandinsky3.training.finetune import finetune, finetune_config
    from kandinsky3.training.run_log import setup_logging

    out = Path(args.out)
    write_dataset(out / "data", args.images, args.repeats)
    add_prior_images(out / "data", args.prior, args.prior_from)
    config = finetune_config("tiny", str(out / "data"), str(out / "wedge.safetensors"), run_dir=str(out / "run"),
                             rank=args.rank, targets=tuple(args.targets), steps=args.steps, lr=args.lr,
                             batch_size=args.batch_size, resolution=SIZE,
                             trigger_words=(WORD,), device="cpu", checkpoint_interval=0,
                             overrides=("schedule.warmup_steps=20",))
    setup_logging(True, out / "run")
    start = time.perf_counter()
    lora_path = finetune(config)
    train_seconds = time.perf_counter() - start

    pipe = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(dtype="fp32"))
    concept = wedge_scene_captions(args.concept_prompts, seed=1000)  # scenes and captions the LoRA never saw
    seen = [text for text, _ in eval_prompts(args.unrelated_prompts, "seen")]
    results = {"concept_images": args.images, "repeats": args.repeats, "prior_images": args.prior,
               "prior_from": args.prior_from,
               "steps": args.steps, "rank": args.rank,
               "targets": args.targets, "train_seconds": round(train_seconds, 1), "concept_prompts": len(concept),
               "unrelated_prompts": len(seen)}
    results["concept_base"], results["concept_base_any_colour"] = concept_rates(pipe, concept)
    triangles = generate(pipe, [text.replace(WORD, "triangle") for text, _ in concept])
    results["reference_triangle_base"] = float(np.mean([shows_wedge(image, scene.objects[0].colour, sign=-1)
                                                        for image, (_, scene) in zip(triangles, concept)]))
    base_accuracy, base_images = unrelated(pipe, seen) if seen else (None, [])
    pipe.load_lora(lora_path, scale=1.0, name=WORD)
    results["concept_lora"], results["concept_lora_any_colour"] = concept_rates(pipe, concept)
    if seen:
        results["unrelated_base"] = base_accuracy
        results["unrelated_lora_scale1"] = unrelated(pipe, seen)[0]
        pipe.set_lora_scale(WORD, 0.0)
        results["unrelated_lora_scale0"], zero_images = unrelated(pipe, seen)
        results["scale0_max_pixel_difference"] = max(float((a - b).abs().max())
                                                     for a, b in zip(base_images, zero_images))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
