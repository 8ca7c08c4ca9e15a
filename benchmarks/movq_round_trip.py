"""The MoVQ's round trip read for prompt adherence, MoVQ runs paired against the bundled small model's MoVQ.

    python benchmarks/movq_round_trip.py runs/small_movq/final           # prompt seeds 7 and 99, 200 per split
    python benchmarks/movq_round_trip.py runs/a/final runs/b/final --prompt-seeds 7 99 1234

Each evaluation prompt's own scene is rendered, encoded, decoded and read by the object reader
(:func:`kandinsky3.evaluation.movq_round_trip`): how well the decoder renders the encoder's own latents.
Every MoVQ reads the same renders as the reference (the bundled model's MoVQ, measured in the same run), so each
prompt is a pair: + counts the prompts a MoVQ reads right that the reference misreads, − the reverse, with the
sign test's p-value (``guidance_paired.py``). The last column is the reconstruction PSNR of ``kandinsky3 eval``
(:func:`~kandinsky3.evaluation.movq_psnr`). A folder is anything holding a MoVQ: a MoVQ run's ``final/``, a model
folder, a MoVQ folder. CPU fp32; ~30 s per MoVQ and prompt seed at the bundled size.

``--with-model`` also generates the bundled model's own images for the same prompts (as ``kandinsky3 eval`` does,
~2 min per prompt seed) and counts, prompt by prompt, which misses the round trip through its MoVQ shares with
them: if the MoVQ were what held the model back, the model would miss where the round trip does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guidance_paired import SPLITS, sign_test  # noqa: E402

from kandinsky3 import evaluation  # noqa: E402
from kandinsky3.pipelines import LoadOptions, load_pipeline  # noqa: E402
from kandinsky3.weights import load_movq  # noqa: E402

REFERENCE = Path(__file__).resolve().parent.parent / "kandinsky3" / "assets" / "tiny" / "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help="folders holding a MoVQ (none: the reference alone)")
    parser.add_argument("--prompt-seeds", nargs="+", type=int, default=[7, 99])
    parser.add_argument("--num-prompts", type=int, default=200, help="prompts per split")
    parser.add_argument("--metric", default="colour_shape", choices=evaluation.SCORE_KEYS)
    parser.add_argument("--with-model", action="store_true", help="pair the round trip with the model's own images")
    args = parser.parse_args()
    for folder in args.folders:  # refuse a wrong path before minutes of round trips
        if not folder.is_dir():
            parser.error(f"{folder}: not a folder")

    movqs = {"bundled (reference)": load_movq(REFERENCE, dtype="fp32")}
    movqs.update({str(folder): load_movq(folder, dtype="fp32") for folder in args.folders})
    records = {name: {} for name in movqs}
    for name, movq in movqs.items():
        for seed in args.prompt_seeds:
            reports = evaluation.movq_round_trip(movq, args.num_prompts, prompt_seed=seed, keep_records=True)
            for split in SPLITS:
                records[name].setdefault(split, []).extend(reports[split]["records"])

    print(f"metric {args.metric}; prompt seeds {args.prompt_seeds}, {args.num_prompts} prompts per split each")
    print("| MoVQ | split | read right | + | − | p (sign test) | PSNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    reference = records["bundled (reference)"]
    for name, movq in movqs.items():
        psnr = evaluation.movq_psnr(movq)
        for split in SPLITS:
            pairs = [(a[args.metric], b[args.metric]) for a, b in zip(reference[split], records[name][split])
                     if a[args.metric] is not None]
            gained = sum(1 for a, b in pairs if b and not a)
            lost = sum(1 for a, b in pairs if a and not b)
            print(f"| {name} | {split} | {sum(b for _, b in pairs)}/{len(pairs)} | {gained} | {lost} | "
                  f"{sign_test(gained, lost):.2f} | {psnr:.2f} |", flush=True)
    if args.with_model:
        shared_misses(reference, args)


def shared_misses(round_trip: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Prompt by prompt: does the bundled model miss where the round trip through its own MoVQ misses?"""
    pipe = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(dtype="fp32"))
    generated: dict[str, list[dict]] = {}
    for seed in args.prompt_seeds:
        reports = evaluation.evaluate_text_to_image(pipe, args.num_prompts, prompt_seed=seed, keep_records=True)
        for split in SPLITS:
            generated.setdefault(split, []).extend(reports[split]["records"])
    print(f"\nthe bundled model's images against the round trip through its MoVQ ({args.metric})")
    print("| split | model right | round trip right | both miss | round trip misses only | model misses only |")
    print("|---|---|---|---|---|---|")
    for split in SPLITS:
        pairs = [(a[args.metric], b[args.metric]) for a, b in zip(round_trip[split], generated[split])
                 if a[args.metric] is not None]
        print(f"| {split} | {sum(b for _, b in pairs)}/{len(pairs)} | {sum(a for a, _ in pairs)}/{len(pairs)} | "
              f"{sum(1 for a, b in pairs if not a and not b)} | {sum(1 for a, b in pairs if not a and b)} | "
              f"{sum(1 for a, b in pairs if a and not b)} |")


if __name__ == "__main__":
    main()
