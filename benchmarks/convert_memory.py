"""Peak memory of the streaming converter on a multi-GB original-layout U-Net file.

Writes a random fp32 U-Net container ``weights/kandinsky3.pt`` ({unet, null_embedding}, the 3.1 layout) of a
scaled-down config (model_channels 192: 835M parameters, 3.3 GB fp32, the same 1068 keys as the released model),
then runs ``kandinsky3 convert SRC DST --dtype fp16 --components unet`` in a fresh subprocess and reports the file
size, the converter process's peak resident set (VmHWM, which counts touched pages of memory-mapped files too) and
the wall time. It also reports the peak of ``load_unet(path, dtype="fp16")`` from the same file. With
``--baseline`` it also measures the naive route for comparison: ``torch.load`` (no mmap) + cast +
``safetensors.torch.save_file``.

Usage::

    python benchmarks/convert_memory.py [--workdir /tmp/k3bench] [--model-channels 192] [--keep] [--baseline]

Creating the file needs about its size in RAM once, in its own subprocess (the dict is built in memory and
``torch.save``d); the files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from kandinsky3.models.unet import UNet, UNetConfig

# Peak RSS of the child's own address space: VmHWM in /proc/self/status. (ru_maxrss is not usable here: Linux
# carries the parent's high-water mark into a child across fork + exec.) Both count touched mmap pages.
PEAK = "print('PEAK_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
CHILD_CONVERT = textwrap.dedent("""
    import sys
    from kandinsky3.cli import main
    status = main(["convert", sys.argv[1], sys.argv[2], "--dtype", "fp16", "--components", "unet"])
""") + PEAK
CHILD_BASELINE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    data = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    save_file({k: v.half().contiguous() for k, v in data["unet"].items()}, sys.argv[2])
""") + PEAK
CHILD_IDLE = "import torch, kandinsky3.weights\n" + PEAK
CHILD_LOAD = textwrap.dedent("""
    import sys
    from kandinsky3.weights import load_unet
    unet = load_unet(sys.argv[1], dtype="fp16")
""") + PEAK
CHILD_WRITE = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from convert_memory import write_source
    write_source(Path(sys.argv[1]), int(sys.argv[2]))
""") + PEAK


def write_source(root: Path, model_channels: int) -> Path:
    """Random fp32 ``root/weights/kandinsky3.pt`` for UNetConfig(model_channels, init = mc/2, time = 4 mc)."""
    config = UNetConfig(model_channels=model_channels, init_channels=model_channels // 2,
                        time_embed_dim=4 * model_channels)
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in UNet(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in shapes.items()}
    path = root / "weights" / "kandinsky3.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"unet": state, "null_embedding": torch.randn(config.context_dim, generator=generator)}, path)
    return path


def run_child(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of ``python -c code args`` in a fresh process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_KB"))
    return int(line.split()[1]) / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/k3_convert_bench", help="scratch folder (deleted unless --keep)")
    parser.add_argument("--model-channels", type=int, default=192, help="U-Net width (192: 3.3 GB fp32)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--baseline", action="store_true", help="also measure torch.load + save_file")
    args = parser.parse_args()
    root = Path(args.workdir)
    if root.exists():
        shutil.rmtree(root)
    try:
        here = str(Path(__file__).resolve().parent)
        _, wall = run_child(CHILD_WRITE, str(root / "src"), str(args.model_channels), here)
        source = root / "src" / "weights" / "kandinsky3.pt"
        size = source.stat().st_size
        print(f"source {source}: {size / 1e9:.2f} GB fp32, written in {wall:.1f} s (in a subprocess)")
        idle, _ = run_child(CHILD_IDLE)
        print(f"interpreter + torch + kandinsky3.weights imported: peak RSS {idle:.0f} MB")
        peak, wall = run_child(CHILD_CONVERT, str(root / "src"), str(root / "dst"))
        out = root / "dst" / "unet" / "model.safetensors"
        print(f"kandinsky3 convert --dtype fp16: peak RSS {peak:.0f} MB ({peak * 2**20 / size:.1%} of the file), "
              f"wall {wall:.1f} s, output {out.stat().st_size / 1e9:.2f} GB")
        peak, wall = run_child(CHILD_LOAD, str(source))
        print(f"load_unet(fp32 .pt, dtype='fp16'): peak RSS {peak:.0f} MB (fp16 weights {size / 2 / 2**20:.0f} MB), "
              f"wall {wall:.1f} s")
        if args.baseline:
            peak, wall = run_child(CHILD_BASELINE, str(source), str(root / "baseline.safetensors"))
            share = peak * 2**20 / size
            print(f"baseline torch.load + save_file: peak RSS {peak:.0f} MB ({share:.1%}), wall {wall:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
