"""Guidance weights and schedules on the bundled small model, each paired against the model's default weight.

    python benchmarks/guidance_paired.py                                  # w 1.25 and 1.75 on prompt seeds 7 and 99
    python benchmarks/guidance_paired.py --rows 1.25 linear:0.5:2.5 linear:2.5:0.5 --prompt-seeds 7 99

A row is a constant weight ``W`` or a schedule ``linear:A:B``, w(t) = A + (B − A)·t/999 over the timesteps t
(999 = pure noise, sampled first; ``linear:0.5:2.5`` guides most at the start, ``linear:2.5:0.5`` at the end).
The pipelines have no schedule option: a schedule row wraps the CFG denoiser for that row only
(:func:`scheduled_guidance`: the weight is read from the timestep of each call), which is all a schedule changes.

Every row generates the same prompts (``kandinsky3 eval``'s, on the tuning prompt seeds: keep the reported 1234
out of tuning) with the same seeds as the reference, the model's own constant weight, so each prompt is a pair:
the table counts the prompts a row gets right that the reference gets wrong (+) and the reverse (−), with the
two-sided sign test's p-value on those discordant prompts. Most prompts come out the same under a small change
of w, so this tells a real difference from noise where the two accuracies alone (±3 points at 200 prompts)
cannot. CPU fp32, 200 prompts per split as in the model card; ~2.5 min per row and prompt seed here.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kandinsky3 import evaluation  # noqa: E402
from kandinsky3.diffusion import guidance  # noqa: E402
from kandinsky3.pipelines import LoadOptions, load_pipeline  # noqa: E402

SPLITS = ("seen", "heldout")


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact binomial p-value of ``gained`` against ``lost`` discordant pairs under p = 1/2."""
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@contextlib.contextmanager
def scheduled_guidance(start: float, end: float):
    """Within the block, every CFG denoiser the pipelines build combines its two branches with w(t) = start +
    (end − start)·t/999 at timestep t instead of its constant w. The denoiser looks ``guided_eps`` up on the module
    at each call and the pipeline looks up ``make_cfg_denoiser``: the wrapper records t, the combination reads it.
    The constant w the pipeline passes must be nonzero (it decides that both branches run)."""
    build, combine = guidance.make_cfg_denoiser, guidance.guided_eps
    current = {}

    def make(bind, cond, uncond, w, **kwargs):
        inner = build(bind, cond, uncond, w, **kwargs)

        def denoiser(x, t):
            current["t"] = float(t[0])
            return inner(x, t)

        return denoiser

    def guided(eps_cond, eps_uncond, w):
        return combine(eps_cond, eps_uncond, start + (end - start) * current["t"] / 999.0)

    guidance.make_cfg_denoiser, guidance.guided_eps = make, guided
    try:
        yield
    finally:
        guidance.make_cfg_denoiser, guidance.guided_eps = build, combine


def parse_row(row: str) -> tuple[float, ...]:
    """``W`` -> (W,); ``linear:A:B`` -> (A, B); anything else raises ValueError."""
    parts = row.split(":")
    try:
        if len(parts) == 1:
            return (float(row),)
        if len(parts) == 3 and parts[0] == "linear":
            return float(parts[1]), float(parts[2])
    except ValueError:
        pass
    raise ValueError(f"row {row!r}: expected a weight W or linear:A:B")


def records(pipe, prompt_seed: int, num_prompts: int, row: str | None) -> dict[str, list[dict]]:
    """Per-prompt scores of one row (None = the reference), per split, generated as ``kandinsky3 eval`` does."""
    kwargs, context = {}, contextlib.nullcontext()
    weights = parse_row(row) if row is not None else ()
    if len(weights) == 2:
        context = scheduled_guidance(*weights)
    elif weights:
        kwargs["guidance_scale"] = weights[0]
    with context:
        reports = evaluation.evaluate_text_to_image(pipe, num_prompts, prompt_seed=prompt_seed, keep_records=True,
                                                    **kwargs)
    return {split: reports[split]["records"] for split in SPLITS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["1.25", "1.75"], help="W or linear:A:B")
    parser.add_argument("--prompt-seeds", nargs="+", type=int, default=[7, 99])
    parser.add_argument("--num-prompts", type=int, default=200, help="prompts per split")
    parser.add_argument("--metric", default="colour_shape", choices=evaluation.SCORE_KEYS)
    args = parser.parse_args()
    for row in args.rows:  # refuse a bad row before minutes of generation
        try:
            parse_row(row)
        except ValueError as error:
            parser.error(str(error))

    pipe = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(dtype="fp32"))
    default = pipe.sampling_defaults.guidance_scale
    print(f"bundled small model, reference: constant w = {default}; metric {args.metric}; "
          f"{args.num_prompts} prompts per split")
    print("| row | prompt seed | split | reference | row | + | − | p (sign test) |")
    print("|---|---|---|---|---|---|---|---|")
    totals: dict[tuple[str, str], list[int]] = {}
    for seed in args.prompt_seeds:
        reference = records(pipe, seed, args.num_prompts, None)
        for row in args.rows:
            candidate = records(pipe, seed, args.num_prompts, row)
            for split in SPLITS:
                pairs = [(a[args.metric], b[args.metric]) for a, b in zip(reference[split], candidate[split])
                         if a[args.metric] is not None]
                ref_hits, row_hits = sum(a for a, _ in pairs), sum(b for _, b in pairs)
                gained = sum(1 for a, b in pairs if b and not a)
                lost = sum(1 for a, b in pairs if a and not b)
                total = totals.setdefault((row, split), [0, 0, 0, 0, 0])
                for i, value in enumerate((ref_hits, row_hits, gained, lost, len(pairs))):
                    total[i] += value
                print(f"| {row} | {seed} | {split} | {ref_hits}/{len(pairs)} | {row_hits}/{len(pairs)} | "
                      f"{gained} | {lost} | {sign_test(gained, lost):.2f} |", flush=True)
    for (row, split), (ref_hits, row_hits, gained, lost, n) in totals.items():
        print(f"| {row} | all | {split} | {ref_hits}/{n} | {row_hits}/{n} | {gained} | {lost} | "
              f"{sign_test(gained, lost):.2f} |")


if __name__ == "__main__":
    main()
