"""Where one U-Net training step's time goes: data, MoVQ latents, T5 + projection, U-Net forward, backward,
optimizer, EMA — for a training config, at 1 and 2 threads, in fp32 and under bf16 autocast.

    python benchmarks/train_step.py                              # configs/small_unet.json, 1 and 2 threads
    python benchmarks/train_step.py --threads 2 --precision bf16 --steps 20
    python benchmarks/train_step.py --ddp 2                      # 2 gloo processes × 1 thread, the global batch split
    python benchmarks/train_step.py --threads 2 --t5 cached per-step   # a frozen T5 looked up, against run per batch
    python benchmarks/train_step.py --threads 2 --t5 cached --unet-layout default channels_last

Each phase is timed around the trainer's own functions (``draw_step``, ``micro_batch``, ``training_conditions``,
``q_sample`` + the U-Net, ``backward``, ``optimizer_step``, ``EMA.update``), after warm-up steps; the MoVQ row is
the cost the latent cache saves (encoding the batch's images, which a cached run does once per image). A frozen T5
is looked up as the trainer does (``--t5 cached``, :mod:`kandinsky3.training.text_cache`) or run on every batch as
before (``per-step``); both are timed in the same run by default. The reference in the same run is the plain sum:
"step" is measured end to end and compared with the phases' total.
The models start from the bundled small model (``kandinsky3/assets/tiny/base``: its MoVQ, T5 and tokenizer) with
the config's U-Net, so no run folder is needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kandinsky3.conditioning import training_conditions  # noqa: E402
from kandinsky3.diffusion.schedule import q_sample  # noqa: E402
from kandinsky3.training.config import load_config  # noqa: E402
from kandinsky3.training.ema import EMA  # noqa: E402
from kandinsky3.training.image_datasets import training_images  # noqa: E402
from kandinsky3.training.initial_models import initial_models  # noqa: E402
from kandinsky3.training.optim import autocast, build_optimizer, make_grad_scaler, optimizer_step  # noqa: E402
from kandinsky3.training.text_cache import look_up_t5  # noqa: E402
from kandinsky3.training.train_unet import DiffusionModel, draw_step, micro_batch, prepare_training_set  # noqa: E402
from kandinsky3.weights.loading import load_movq  # noqa: E402

BUNDLED = ROOT / "kandinsky3" / "assets" / "tiny" / "base"
PHASES = ("data", "movq_encode", "t5", "unet_forward", "backward", "optimizer", "ema")


def build(config_path: str, overrides: list[str], rank: int = 0, world: int = 1, t5: str = "cached"):
    from kandinsky3.training.distributed import DistributedContext

    config = load_config(config_path, [
        f"text.encoder_path={BUNDLED}", f"model.movq_path={BUNDLED}", "data.num_samples=512", "text.t5_config={}",
        f"data.latent_cache={tempfile.gettempdir()}/train_step_latents.pt",
        *overrides])
    ctx = DistributedContext(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    movq = load_movq(config.model.movq_path, dtype=torch.float32, device=ctx.device).requires_grad_(False)
    movq = movq.to(memory_format=torch.channels_last)  # as the trainer holds it
    images = training_images(config.data)
    unet, text_encoder = initial_models(config, images.all_captions(), Path("/nonexistent"), True)
    model = DiffusionModel(unet, text_encoder)
    if t5 == "cached" and not config.text.train_t5:
        look_up_t5(model.text_encoder, images.all_captions())
    data = prepare_training_set(config, ctx, images, images.all_captions(), model.text_encoder, movq)
    return config, ctx, movq, data, model


def time_phases(config, ctx, movq, data, model, steps: int, warmup: int, precision: str) -> dict[str, list[float]]:
    """Per-phase seconds of ``steps`` optimizer steps (the micro-batch this process owns)."""
    ddp = None
    if ctx.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer("adamw", model.named_parameters(), 1e-4, (0.9, 0.99), 0.01)
    scaler = make_grad_scaler("fp32", ctx.device)
    ema = EMA(model, 0.999)
    batch = config.schedule.batch_size
    part = slice(ctx.rank * batch // ctx.world_size, (ctx.rank + 1) * batch // ctx.world_size)
    times: dict[str, list[float]] = defaultdict(list)
    for step in range(warmup + steps):
        record = step >= warmup
        clock = time.perf_counter()
        marks = {}

        def mark(name):
            nonlocal clock
            now = time.perf_counter()
            marks[name] = now - clock
            clock = now

        start = clock
        draws = draw_step(config, step, len(data), movq, ctx.device)
        x0, ids, mask, extra, weights = micro_batch(config, data, movq, draws, part, ctx.device)
        mark("data")
        with torch.no_grad():
            movq.encode(data.images.batch(draws.indices[part])[0])
        mark("movq_encode")
        with autocast(ctx.device, precision):
            context, cmask = training_conditions(model.text_encoder, ids, mask, draws.drop[part], style="original")
            mark("t5")
            x_t = q_sample(x0, draws.noise[part], draws.t[part], model.alphas_cumprod)
            eps = model.unet(x_t, draws.t[part], context, cmask)
            loss = torch.nn.functional.mse_loss(eps.float(), draws.noise[part].float())
        mark("unet_forward")
        if ddp is not None:  # the real trainer's all-reduce: run the DDP module's forward + backward instead
            with autocast(ctx.device, precision):
                loss = ddp(x0, ids, mask, draws.t[part], draws.noise[part], draws.drop[part], extra, weights)
            optimizer.zero_grad(set_to_none=True)
            mark("ddp_forward_again")
        loss.backward()
        mark("backward")
        optimizer_step(optimizer, scaler, model.parameters(), 1.0)
        mark("optimizer")
        ema.update(model, step)
        mark("ema")
        if record:
            for name, seconds in marks.items():
                times[name].append(seconds)
            times["step (measured)"].append(time.perf_counter() - start)
    return times


def report(label: str, times: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    step = medians.pop("step (measured)")
    cached_total = sum(v for k, v in medians.items() if k not in ("movq_encode", "ddp_forward_again"))
    print(f"\n{label}: measured step {step * 1000:.0f} ms (the latent cache saves the movq_encode row); "
          f"cached-latent step = {cached_total * 1000:.0f} ms")
    print("| phase | ms | % of cached step |\n|---|---|---|")
    for name, value in medians.items():
        share = "" if name in ("movq_encode", "ddp_forward_again") else f"{100 * value / cached_total:.1f}"
        print(f"| {name} | {value * 1000:.1f} | {share} |")


def _ddp_worker(rank: int, world: int, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        parts = build(args.config, args.override, rank, world)
        times = time_phases(*parts, steps=args.steps, warmup=args.warmup, precision=args.precision)
        if rank == 0:
            # under DDP the forward runs twice here (once timed alone, once through DDP); the step that counts is
            # data + DDP forward + backward (with the all-reduce) + optimizer + EMA
            medians = {k: statistics.median(v) for k, v in times.items()}
            step = sum(medians[k] for k in ("data", "ddp_forward_again", "backward", "optimizer", "ema"))
            print(f"\n{world} processes × 1 thread (gloo), global batch {parts[0].schedule.batch_size}: "
                  f"step {step * 1000:.0f} ms (data {medians['data'] * 1000:.0f}, forward "
                  f"{medians['ddp_forward_again'] * 1000:.0f}, backward+all-reduce {medians['backward'] * 1000:.0f}, "
                  f"optimizer {medians['optimizer'] * 1000:.0f}, EMA {medians['ema'] * 1000:.0f} ms)")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "small_unet.json"))
    parser.add_argument("--override", action="append", default=[], help="section.key=value, as for train")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ddp", type=int, default=0, help="processes (1 thread each) instead of --threads")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--unet-layout", nargs="+", default=["default"], choices=("default", "channels_last"),
                        help="the U-Net's memory layout (the trainer keeps the default; channels_last to compare)")
    parser.add_argument("--t5", nargs="+", default=["cached", "per-step"], choices=("cached", "per-step"),
                        help="a frozen T5 looked up (as the trainer does) and/or run on every batch")
    args = parser.parse_args()
    if args.ddp:
        torch.multiprocessing.spawn(_ddp_worker, args=(args.ddp, args), nprocs=args.ddp, join=True)
        return
    for t5 in args.t5:
        parts = build(args.config, args.override, t5=t5)
        for layout in args.unet_layout:
            parts[-1].unet.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            for threads in args.threads:
                torch.set_num_threads(threads)
                times = time_phases(*parts, steps=args.steps, warmup=args.warmup, precision=args.precision)
                report(f"{threads} thread(s), {args.precision}, batch {parts[0].schedule.batch_size}, T5 {t5}, "
                       f"U-Net layout {layout}", times)


if __name__ == "__main__":
    main()
