"""MoVQ speed in the two memory layouts: the default (NCHW) against channels-last (NHWC), on this CPU.

    python benchmarks/movq_layout.py                                   # configs/small_movq.json, 2 threads
    python benchmarks/movq_layout.py --override model.ch=24 --threads 1 2

Three timings per layout, each the median of ``--repeats`` after one warm-up: a training step of the MoVQ trainer
(forward with the codebook, L1 + MSE + codebook loss, backward, fused AdamW step) on a batch of the config's
``schedule.batch_size`` shapes images; an encode of 64 images (what the U-Net trainer's latent cache runs 40,000
times over); a decode of 16 latents without autograd (what a pipeline runs). The default layout is the reference
in the same run: the table gives each channels-last time, its speed-up, and the largest difference of the outputs
(latents, images, the step's loss) relative to the largest reference value. The model starts from the config's seeded
initialisation, or from a trained MoVQ (``--weights``: any model folder; the config then gives only the data and the
batch). Weights do not change the cost, but an untrained MoVQ's large activations magnify the layouts' rounding
differences: compare the outputs on trained weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kandinsky3.models.movq import MoVQ  # noqa: E402
from kandinsky3.training.config import load_config  # noqa: E402
from kandinsky3.training.image_datasets import training_images  # noqa: E402
from kandinsky3.training.losses import reconstruction_losses  # noqa: E402
from kandinsky3.training.optim import build_optimizer  # noqa: E402
from kandinsky3.weights.loading import load_movq  # noqa: E402

LAYOUTS = {"default": torch.contiguous_format, "channels_last": torch.channels_last}


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up (mkldnn picks and caches its kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def initial_movq(config, weights: str | None) -> MoVQ:
    if weights:
        return load_movq(weights, dtype=torch.float32)
    torch.manual_seed(config.run.seed)
    return MoVQ(config.model)


def measure(config, weights: str | None, layout: torch.memory_format, images: torch.Tensor,
            repeats: int) -> dict[str, tuple]:
    movq = initial_movq(config, weights).to(memory_format=layout).train()
    optimizer = build_optimizer("adamw", movq.named_parameters(), 1e-4, (0.9, 0.99), 0.0)
    batch = images[:config.schedule.batch_size]
    start_state = {k: v.clone() for k, v in movq.state_dict().items()}

    def step() -> torch.Tensor:
        movq.load_state_dict(start_state)  # every timed step from the same weights, so the losses compare
        reconstruction, vq_loss, _ = movq(batch, generator=torch.Generator().manual_seed(0))
        l1, mse = reconstruction_losses(reconstruction, batch)
        loss = l1 + mse + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    rows = {"training step": median_seconds(step, repeats)}
    movq.load_state_dict(start_state)
    movq.eval()
    with torch.no_grad():
        rows["encode 64 images"] = median_seconds(lambda: movq.encode(images[:64]), repeats)
        latents = rows["encode 64 images"][1][:16].contiguous()
        rows["decode 16 latents"] = median_seconds(lambda: movq.decode(latents), repeats)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "small_movq.json"), help="a MoVQ training config")
    parser.add_argument("--override", action="append", default=[], help="section.key=value, repeatable")
    parser.add_argument("--weights", default=None, help="a trained MoVQ (model folder) instead of a fresh one")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch thread counts to measure")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    args = parser.parse_args()

    config = load_config(args.config, [*args.override, "data.num_samples=64"])
    if config.trainer != "movq":
        raise SystemExit(f"{args.config} is a {config.trainer!r} config; give a MoVQ training config")
    images = training_images(config.data).batch(torch.arange(64))[0]  # (64,3,S,S) in [-1,1]
    print(f"MoVQ {sum(p.numel() for p in initial_movq(config, args.weights).parameters()) / 1e6:.2f}M parameters, "
          f"{config.data.image_size} px, training batch {config.schedule.batch_size}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        results = {name: measure(config, args.weights, layout, images, args.repeats) for name, layout in LAYOUTS.items()}
        print(f"\n{threads} thread(s)")
        print(f"{'':20} {'default, s':>11} {'channels-last, s':>17} {'speed-up':>9} {'rel. diff':>10}")
        for row, (reference, ref_out) in results["default"].items():
            seconds, out = results["channels_last"][row]
            diff = (out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max()
            print(f"{row:20} {reference:11.3f} {seconds:17.3f} {reference / seconds:8.2f}x {diff.item():10.1e}")


if __name__ == "__main__":
    main()
