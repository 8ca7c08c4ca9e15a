"""Full-size Kandinsky 3 end to end: peak RSS and time per phase, this package vs diffusers' Kandinsky3Pipeline.

    python benchmarks/full_size_weights.py /data/k3-random          # once: 24 GB of random weights, diffusers layout
    python benchmarks/pipeline_memory.py /data/k3-random --steps 3 --size 512

Each side runs in its own process. The parent samples the child's resident set every 50 ms and stops it when it
passes ``--limit-gib`` (default 20 GiB on a 24 GiB machine, so that the machine itself never runs out); the table
then says in which phase it was stopped. Phases: load (building the pipeline), encode (T5), denoise (all U-Net
calls; the per-step time is its mean), decode (MoVQ); with ``--offload disk`` (ours, the default) also read-unet and
read-movq, the reading of those components from the files just before their phase. Peak RSS per phase comes from the child's own 20 ms sampler;
the overall peak is the kernel's high-water mark (VmHWM).

Ours runs the way a 24 GB CPU box should: U-Net and MoVQ stored in bf16 and computing in fp32
(``compute_dtype``; bf16 math is slow on CPUs without AVX-512-BF16/AMX), T5 streamed block by block in fp32, and
(``offload="disk"``) the U-Net and MoVQ held only while they run.
diffusers runs with ``torch_dtype=--diffusers-dtype`` (bf16: its smallest footprint; it has no streaming).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "a red cat sitting on a chair, oil on canvas"
GIB = 2**30


def rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Phases:
    """Wall time and peak RSS of consecutive named phases (a 20 ms sampling thread)."""

    def __init__(self):
        self.results: dict[str, dict] = {}
        self.current: str | None = None
        self.started = 0.0
        self.peak = 0
        self.unet_calls = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.02)

    def enter(self, name: str) -> None:
        if name == self.current:
            return
        now = time.perf_counter()
        if self.current is not None:
            self.peak = max(self.peak, rss_bytes())
            self.results[self.current] = {"seconds": now - self.started, "peak_gib": self.peak / GIB}
        print(f"PHASE {name}", flush=True)
        self.current, self.started, self.peak = name, now, rss_bytes()

    def hook(self, module, name: str) -> None:
        def pre(*_):
            if name == "denoise":
                self.unet_calls += 1
            self.enter(name)

        module.register_forward_pre_hook(pre)

    def wrapped(self, function, name: str):
        """``function`` that enters phase ``name`` when called."""
        def call(*args, **kwargs):
            self.enter(name)
            return function(*args, **kwargs)

        return call

    def wrap(self, owner, method: str, name: str) -> None:
        setattr(owner, method, self.wrapped(getattr(owner, method), name))


def child(side: str, folder: Path, steps: int, size: int, diffusers_dtype: str, prefetch: bool, offload: str) -> None:
    import torch

    phases = Phases()
    phases.enter("load")
    if side == "ours":
        from kandinsky3 import get_T2I_pipeline

        pipe = get_T2I_pipeline("cpu", model=folder, dtype_map=torch.bfloat16,
                                load_options={"compute_dtype": torch.float32, "stream_t5": True,
                                              "t5_prefetch": prefetch},
                                offload="disk" if offload == "disk" else False)
        phases.hook(pipe.text_encoder.t5, "encode")
        for name in pipe.residency.reload:  # offload="disk": reading a component from the files is a phase of its own
            pipe.residency.reload[name] = phases.wrapped(pipe.residency.reload[name], f"read-{name}")
        run = lambda: pipe(PROMPT, steps=steps, width=size, height=size, seed=0, progress=False)  # noqa: E731
    else:
        from diffusers import Kandinsky3Pipeline

        pipe = Kandinsky3Pipeline.from_pretrained(str(folder), variant="fp16",
                                                  torch_dtype=getattr(torch, diffusers_dtype))
        phases.hook(pipe.text_encoder, "encode")
        generator = torch.Generator().manual_seed(0)
        run = lambda: pipe(PROMPT, num_inference_steps=steps, width=size, height=size,  # noqa: E731
                           generator=generator)
    phases.hook(pipe.unet.in_layer if side == "ours" else pipe.unet, "denoise")  # ours: a bound U-Net skips forward
    phases.wrap(pipe.movq, "decode", "decode")
    with torch.inference_mode():
        run()
    phases.enter("done")
    result = {"phases": phases.results, "unet_calls": phases.unet_calls, "hwm_gib": rss_bytes(field="VmHWM") / GIB}
    print("RESULT " + json.dumps(result), flush=True)


def run_side(side: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, str(args.folder), "--child", side, "--steps", str(args.steps),
               "--size", str(args.size), "--diffusers-dtype", args.diffusers_dtype]
    command += ["--no-prefetch"] if args.no_prefetch else []
    command += ["--offload", args.offload]
    env = {**os.environ, **({} if args.no_thp else {"THP_MEM_ALLOC_ENABLE": "1"})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    state = {"phase": "start", "result": None, "max_rss": 0, "tail": []}

    def read() -> None:
        for line in process.stdout:
            if line.startswith("PHASE "):
                state["phase"] = line.split()[1]
            elif line.startswith("RESULT "):
                state["result"] = json.loads(line[7:])
            else:
                state["tail"] = (state["tail"] + [line.rstrip()])[-5:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped = False
    while process.poll() is None:
        try:
            state["max_rss"] = max(state["max_rss"], rss_bytes(process.pid))
        except OSError:
            break
        if state["max_rss"] > args.limit_gib * GIB:
            process.kill()
            stopped = True
            break
        time.sleep(0.05)
    process.wait()
    reader.join(timeout=5)
    if stopped:
        return {"stopped": f"passed {args.limit_gib} GiB during {state['phase']}"}
    if state["result"] is None:
        return {"stopped": f"exit {process.returncode} during {state['phase']}: {' | '.join(state['tail'])}"}
    return state["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="written by benchmarks/full_size_weights.py")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--limit-gib", type=float, default=20.0)
    parser.add_argument("--diffusers-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sides", nargs="+", default=["ours", "diffusers"], choices=("ours", "diffusers"))
    parser.add_argument("--no-prefetch", action="store_true", help="ours: stream T5 without reading ahead")
    parser.add_argument("--offload", default="disk", choices=("disk", "none"),
                        help="ours: 'disk' reads the U-Net and MoVQ at their phases (the least memory), 'none' keeps "
                             "every component loaded")
    parser.add_argument("--no-thp", action="store_true",
                        help="both sides: do not put large CPU tensors on 2 MB pages (THP_MEM_ALLOC_ENABLE=1, as the "
                             "kandinsky3 CLI does)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.steps, args.size, args.diffusers_dtype, not args.no_prefetch, args.offload)
        return
    print(f"full-size Kandinsky 3, {args.size} px, {args.steps} steps (CFG batch 2), prompt {PROMPT!r}")
    print(f"{'side':10} {'phase':8} {'seconds':>9} {'peak GiB':>9}")
    results = {}
    for side in args.sides:
        result = results[side] = run_side(side, args)
        if "stopped" in result:
            print(f"{side:10} stopped: {result['stopped']}")
            continue
        for phase, numbers in result["phases"].items():
            print(f"{side:10} {phase:8} {numbers['seconds']:9.1f} {numbers['peak_gib']:9.2f}")
        denoise = result["phases"].get("denoise", {}).get("seconds", float("nan"))
        print(f"{side:10} {'step':8} {denoise / max(result['unet_calls'], 1):9.1f}   ({result['unet_calls']} U-Net calls)")
        print(f"{side:10} {'overall':8} {'':9} {result['hwm_gib']:9.2f}   (VmHWM)")
    if all("hwm_gib" in results.get(side, {}) for side in ("ours", "diffusers")):
        print(f"peak RSS ratio ours/diffusers: {results['ours']['hwm_gib'] / results['diffusers']['hwm_gib']:.2f}")


if __name__ == "__main__":
    main()
