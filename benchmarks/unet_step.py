"""U-Net step time and peak memory: ours vs diffusers' Kandinsky3UNet with the same weights.

    python benchmarks/unet_step.py                       # medium config, fp32 and bf16
    python benchmarks/unet_step.py --config full         # the released 3B config (12 GB fp32 per side)
    python benchmarks/unet_step.py --config medium --dtypes bf16 --repeats 7

Each (implementation, dtype) runs in its own subprocess so its peak RSS (VmHWM) is its own.
Per step: batch 2 (the CFG batch), a 64×64 latent (512 px), a 20-token context; the median of
``--repeats`` timed forward passes after one warm-up.  FLOPs come from
``torch.utils.flop_counter``; the machine's matmul throughput from a 2048² GEMM measured in the
same run, so "fraction of limit" = FLOP / time / GEMM rate. Ours runs as the pipelines run it: the
conditional norms' inputs come from a table built once for a 50-step run (``UNet.bind``), and
1/50 of the table's build time is added to each step. Both sides get ``THP_MEM_ALLOC_ENABLE=1`` (large
CPU tensors on 2 MB pages, as the kandinsky3 CLI sets it) unless ``--no-thp``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    # diffusers Kandinsky3UNet arguments; ours is built from the same dict via UNetConfig.from_diffusers
    "medium": dict(block_out_channels=(128, 256, 512, 1024), time_embedding_dim=512, cross_attention_dim=1024,
                   encoder_hid_dim=1024, attention_head_dim=64, groups=32, layers_per_block=3),
    "full": dict(),  # the released defaults
}


def gemm_gflops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
    """The machine's matmul limit: the best of ``repeats`` 2048² GEMMs (a limit is a best case)."""
    import torch

    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=getattr(torch, dtype))
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def random_weights(shapes: dict, dtype, seed: int = 0) -> dict:
    """N(0, 0.02) tensors for the diffusers key → shape map, in key order (the same weights on both sides)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for key, shape in shapes.items()}


def run_one(impl: str, config_name: str, dtype_name: str, repeats: int) -> dict:
    """Build one implementation, time it, return the numbers (runs inside a subprocess).

    impl: "diffusers", "ours", or "ours-bf16-storage" (weights stored in bf16, layers computing in dtype_name).
    Weights are generated tensor by tensor straight into the model (no second copy), so peak RSS is the model's.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import Kandinsky3UNet
    from torch.utils.flop_counter import FlopCounterMode

    from kandinsky3.models import UNet, UNetConfig
    from kandinsky3.lowmem.storage import compute_in
    from kandinsky3.weights.unet_keys import diffusers_to_original_unet

    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        reference = Kandinsky3UNet(**CONFIGS[config_name])
    shapes = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    stored = torch.bfloat16 if impl == "ours-bf16-storage" else dtype
    weights = random_weights(shapes, stored)
    generator = torch.Generator().manual_seed(1)
    hid = reference.config.encoder_hid_dim
    x = torch.randn(2, 4, 64, 64, generator=generator).to(dtype)
    raw = torch.randn(2, 20, hid, generator=generator).to(dtype)
    mask = torch.ones(2, 20, dtype=torch.bool)
    t = torch.tensor([500, 500])
    if impl.startswith("ours"):
        unet_sd, projection_sd = diffusers_to_original_unet(weights)
        with torch.device("meta"):
            model = UNet(UNetConfig.from_diffusers(dict(reference.config)))
        model.load_state_dict(unet_sd, assign=True)
        if stored != dtype:
            compute_in(model, dtype)
        p = {key: value.to(dtype) for key, value in projection_sd.items()}
        context = F.layer_norm(F.linear(raw, p["0.weight"]), (p["1.weight"].shape[0],), p["1.weight"], p["1.bias"])
        del reference, unet_sd, weights
        # as the pipelines run it: the conditional norms' inputs precomputed once for a 50-step run
        timesteps = list(range(999, 0, -20)) + [500]
        start = time.perf_counter()
        with torch.inference_mode():
            bound = model.bind(context, mask, timesteps)
        table_share = (time.perf_counter() - start) / 50
        step = lambda: bound(x, t)  # noqa: E731
    else:
        reference.load_state_dict(weights, assign=True)
        del weights
        model = reference
        step = lambda: model(x, t, encoder_hidden_states=raw, encoder_attention_mask=mask.to(dtype)).sample  # noqa: E731
    model.eval()
    with torch.inference_mode():
        step()
        with FlopCounterMode(display=False) as counter:
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    peak_kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    if impl.startswith("ours"):
        times = [seconds + table_share for seconds in times]
    return {"seconds": statistics.median(times), "gflop": counter.get_total_flops() / 1e9, "peak_gib": peak_kib / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="medium", help="U-Net size")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes to measure")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--storage", action="store_true",
                        help="fp32 leg: also ours with weights stored in bf16 and fp32 math (compute_in)")
    parser.add_argument("--no-thp", action="store_true",
                        help="do not put large CPU tensors on 2 MB pages (THP_MEM_ALLOC_ENABLE=1 for both sides)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtypes = [{"fp32": "float32", "bf16": "bfloat16"}.get(d, d) for d in args.dtypes]
    if args.child:
        print(json.dumps(run_one(args.child[0], args.config, args.child[1], args.repeats)))
        return
    print(f"config {args.config}, batch 2, 64x64 latent, median of {args.repeats}")
    print(f"{'dtype':<9} {'impl':<18} {'s/step':>8} {'GFLOP':>8} {'GFLOP/s':>8} {'% of GEMM':>9} {'peak GiB':>9}")
    for dtype in dtypes:
        limit = gemm_gflops(dtype)
        rows = {}
        impls = ("diffusers", "ours") + (("ours-bf16-storage",) if dtype == "float32" and args.storage else ())
        for impl in impls:
            env = {**os.environ, **({} if args.no_thp else {"THP_MEM_ALLOC_ENABLE": "1"})}
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--repeats", str(args.repeats),
                                  "--child", impl, dtype], capture_output=True, text=True, check=True, env=env)
            rows[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[impl]
            rate = r["gflop"] / r["seconds"]
            print(f"{dtype:<9} {impl:<18} {r['seconds']:>8.3f} {r['gflop']:>8.1f} {rate:>8.1f} "
                  f"{100 * rate / limit:>8.1f}% {r['peak_gib']:>9.2f}")
        if "ours-bf16-storage" in rows:
            r = rows["ours-bf16-storage"]
            print(f"{dtype:<9} ratio ours-bf16-storage/diffusers: time {r['seconds'] / rows['diffusers']['seconds']:.2f}, "
                  f"peak memory {r['peak_gib'] / rows['diffusers']['peak_gib']:.2f}")
        print(f"{dtype:<9} ratio ours/diffusers: time {rows['ours']['seconds'] / rows['diffusers']['seconds']:.2f}, "
              f"peak memory {rows['ours']['peak_gib'] / rows['diffusers']['peak_gib']:.2f} "
              f"(GEMM limit {limit:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
