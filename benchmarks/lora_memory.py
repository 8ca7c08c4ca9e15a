"""Peak GPU memory of LoRA training on the released 3B U-Net, computed on the meta device (no GPU, no weights).

    python benchmarks/lora_memory.py                       # 1024 px, batch 1 and 2, rank 16 attention LoRA
    python benchmarks/lora_memory.py --size 768 --batch 4 --rank 32

What the fine-tuning trainer holds on the GPU during a step (kandinsky3.training.finetune):

* weights: the frozen U-Net in bf16 (``model.dtype``), the fp32 text projection and null embedding (T5 is gone:
  its states are cached), the fp32 LoRA;
* the LoRA's gradients and AdamW's two moments (fp32);
* activations: the tensors autograd saves for the backward pass, counted with ``saved_tensors_hooks`` during a
  real forward of the meta-device model in bf16 (the dtype autocast computes the big ops in). With gradient
  checkpointing the saved set is: what lies outside the checkpointed blocks, each block's input, and while one
  block is recomputed in the backward pass, that block's own saved tensors; plus the activation gradients in
  flight (counted as twice the largest block input). Attention is counted as the meta kernel saves it, which
  for self-attention at 4096 tokens includes the (B, heads, L, L) probabilities of the math kernel; a GPU's
  memory-efficient kernel keeps only O(L), so the figures are an upper bound there.
* the MoVQ waits on the CPU between sample grids, so it is not counted.

Add the CUDA context and allocator slack (about 1 GiB) to compare with a card's size.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 2**30


@contextlib.contextmanager
def counting_saved(total: list[int], weights: set[int]):
    """Add the bytes of every tensor autograd saves inside the block to total[0], except the weights themselves
    (``weights``: ids of the parameters; a saved weight or a view of one costs nothing more)."""
    import torch

    def pack(tensor):
        if id(tensor) not in weights and id(tensor._base) not in weights:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def activation_bytes(size: int, batch: int, rank: int, checkpointing: bool) -> dict[str, int]:
    """Saved-for-backward bytes of one training forward of the 3B U-Net (bf16 weights and inputs, LoRA on the
    attention projections), with or without gradient checkpointing."""
    import torch

    from kandinsky3.lora import LoraSpec, inject_lora
    from kandinsky3.models.unet import UNet, UNetConfig
    from kandinsky3.training.finetune import checkpoint_blocks

    with torch.device("meta"):
        unet = UNet(UNetConfig()).to(torch.bfloat16)
    inject_lora(unet, None, LoraSpec(rank=rank), "a", trainable=True, dtype=torch.bfloat16)
    weights = {id(p) for p in unet.parameters()}
    blocks = [b for level in (*unet.down_samples, *unet.up_samples)
              for b in (*level.resnet_attn_blocks, level.self_attention_block) if b is not None]
    inputs, own = [], []
    if checkpointing:
        for block in blocks:  # each block's input stays alive; its inside is measured once, on its own
            def record(module, args, kwargs=None):
                inputs.append(args[0].numel() * args[0].element_size())
                inside = [0]
                with counting_saved(inside, weights):
                    type(module).forward(module, *args)
                own.append(inside[0])
            block.register_forward_pre_hook(record)
        checkpoint_blocks(unet)
    latent = size // 8
    x = torch.randn(batch, 4, latent, latent, device="meta", dtype=torch.bfloat16)
    context = torch.randn(batch, 77, 4096, device="meta", dtype=torch.bfloat16)
    mask = torch.ones(batch, 77, dtype=torch.bool, device="meta")
    outside = [0]
    with counting_saved(outside, weights):
        unet(x, torch.zeros(batch, dtype=torch.long, device="meta"), context, mask)
    if not checkpointing:
        return {"saved": outside[0]}
    return {"outside_blocks": outside[0], "block_inputs": sum(inputs), "largest_block": max(own),
            "gradients_in_flight": 2 * max(inputs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="images per step (per GPU)")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    from kandinsky3.lora import LoraSpec, inject_lora
    from kandinsky3.models.unet import UNet, UNetConfig

    with torch.device("meta"):
        unet = UNet(UNetConfig())
    base = sum(p.numel() for p in unet.parameters())
    lora = sum(p.numel() for p in inject_lora(unet, None, LoraSpec(rank=args.rank), "a", trainable=True))
    fixed = {"unet_bf16": 2 * base, "text_projection_fp32": 4 * (4096 * 4096 + 3 * 4096),
             "lora_fp32": 4 * lora, "lora_grads_fp32": 4 * lora, "adamw_moments_fp32": 8 * lora}
    print(f"U-Net {base / 1e9:.3f}B parameters; LoRA rank {args.rank} on the attention projections: {lora:,} "
          f"({100 * lora / base:.2f} %)")
    for name, value in fixed.items():
        print(f"  {name:24s} {value / GIB:7.3f} GiB")
    for batch in args.batch:
        for checkpointing in (True, False):
            parts = activation_bytes(args.size, batch, args.rank, checkpointing)
            total = sum(fixed.values()) + sum(parts.values())
            detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items())
            print(f"{args.size} px, batch {batch}, checkpointing {'on ' if checkpointing else 'off'}: "
                  f"activations {sum(parts.values()) / GIB:6.2f} GiB ({detail}); total {total / GIB:6.2f} GiB")


if __name__ == "__main__":
    main()
