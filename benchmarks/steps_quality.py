"""Fewer steps for the same quality: samplers and step counts on the bundled small model.

    python benchmarks/steps_quality.py                    # 50 prompts per split (seen, held-out)
    python benchmarks/steps_quality.py --num-prompts 200
    python benchmarks/steps_quality.py --rows original:50 dpmpp_2m_sde:20

For each (sampler, steps): colour+shape accuracy (seen and held-out), position accuracy, seconds per image, and
the mean absolute pixel distance (0-255 scale) to a reference image made with the same prompt and seed by DDIM
(η = 0, a deterministic probability-flow sampler) at 200 steps. All rows use the same prompts and seeds, so the
accuracies are paired comparisons. Images are at the model's own size with its own guidance (what a user gets;
128×128 and w = 1.5 for the bundled model), CPU fp32. The distance is to one solution of
the probability-flow ODE; the stochastic samplers (original, dpmpp_2m_sde) sample other paths by design, so for them
it measures how far their randomness moves an image, not their error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = (("original", 50), ("ddim", 50), *(("dpmpp_2m", n) for n in (10, 15, 20, 25)),
        *(("dpmpp_2m_sde", n) for n in (10, 15, 20, 25)))
REFERENCE = ("ddim", 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=50, help="prompts per split")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--rows", nargs="+", default=[f"{name}:{steps}" for name, steps in ROWS],
                        help="sampler:steps pairs to measure")
    args = parser.parse_args()
    rows = [(row.split(":")[0], int(row.split(":")[1])) for row in args.rows]

    from kandinsky3 import get_T2I_pipeline
    from kandinsky3.data.shapes import eval_prompts
    from kandinsky3.evaluation import evaluate

    pipe = get_T2I_pipeline("cpu", model="tiny")
    size = pipe.sampling_defaults.width
    splits = {split: eval_prompts(args.num_prompts, split) for split in ("seen", "heldout")}

    def images_for(sampler: str, steps: int) -> tuple[dict, dict[str, list[np.ndarray]], float]:
        """Accuracy reports per split, the images per split, seconds per image."""
        reports, images, seconds = {}, {}, 0.0
        for split, prompts in splits.items():
            made: list[np.ndarray] = []

            def generate(batch: list[str], batch_seed: int):
                nonlocal seconds
                start = time.perf_counter()
                out = pipe(batch, width=size, height=size, seed=batch_seed * 1000, steps=steps, sampler=sampler,
                           progress=False)  # ddim: η = 0 by default
                seconds += time.perf_counter() - start
                made.extend(np.asarray(image, dtype=np.float32) for image in out)
                return out

            report = evaluate(generate, prompts, batch_size=args.batch_size, seed=0)
            report.pop("records")
            reports[split], images[split] = report, made
        return reports, images, seconds / sum(len(p) for p in splits.values())

    _, reference, reference_seconds = images_for(*REFERENCE)
    print(f"bundled small model at {size} px, guidance {pipe.sampling_defaults.guidance_scale}, "
          f"{args.num_prompts} prompts per split; reference {REFERENCE[0]} "
          f"{REFERENCE[1]} steps ({reference_seconds:.2f} s/image)")
    print(f"{'sampler':12} {'steps':>5} {'seen':>6} {'heldout':>8} {'position':>9} {'dist/255':>9} {'s/image':>8}")
    for sampler, steps in rows:
        reports, images, seconds = images_for(sampler, steps)
        distance = np.mean([np.abs(a - b).mean() for split in splits
                            for a, b in zip(images[split], reference[split])])
        counts = [reports[split]["position_n"] for split in splits]
        position = sum(reports[split]["position"] * n for split, n in zip(splits, counts) if n) / max(sum(counts), 1)
        print(f"{sampler:12} {steps:5d} {100 * reports['seen']['colour_shape']:5.1f}% "
              f"{100 * reports['heldout']['colour_shape']:7.1f}% {100 * position:8.1f}% "
              f"{distance:9.2f} {seconds:8.2f}")


if __name__ == "__main__":
    main()
