"""Convert original or diffusers checkpoints to the native layout, tensor by tensor.

Every tensor is read from its (memory-mapped or positioned-read) source, cast, written with
:func:`kandinsky3.weights.safe_io.write_safetensors`, and released before the next one, so peak memory stays near
the largest single tensor plus the interpreter, whatever the checkpoint size (``benchmarks/convert_memory.py``
measures it). The writing is :func:`kandinsky3.weights.native.write_native`'s: names and shapes are checked against
the target networks, and the folder appears under its name only when complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kandinsky3.components import COMPONENTS
from kandinsky3.weights.build import resolve_config
from kandinsky3.weights.loading import open_checkpoint
from kandinsky3.weights.native import check_destination, manifest_fields, write_native
from kandinsky3.weights.sources import ModelSource

__all__ = ["convert"]


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    variant: str | None = None,
    dtype: str | torch.dtype | None = None,
    components: tuple[str, ...] = COMPONENTS,
    t5_path: str | Path | None = None,
    overwrite: bool = False,
    head_dim: int = 64,
    groups: int = 32,
    norm_groups: int = 32,
) -> Path:
    """Write ``components`` of the checkpoint ``src`` (folder or Hub repo id) to the native folder ``dst``.

    ``variant`` picks the original files (base, flash, inpainting); ``dtype`` ("fp16", "bf16", "fp32" or None to
    keep) applies to floating tensors (T5's ``wo`` stays fp32 under fp16). ``head_dim``/``groups``/``norm_groups``
    are used only where a config is inferred from an original file. The source's conditioning, scheduler config and
    sampling defaults are kept. Returns ``dst``.
    """
    checkpoint = open_checkpoint(src, variant=variant, components=tuple(components), t5_path=t5_path)
    check_destination(Path(dst), overwrite)  # before any config is inferred
    hints = {"unet": dict(head_dim=head_dim, groups=groups), "movq": dict(norm_groups=norm_groups)}
    models = {}
    for kind, opener in (("unet", checkpoint.unet_source), ("movq", checkpoint.movq_source)):
        if kind in components:
            source = opener()
            models[kind] = ModelSource(source.tensors, resolve_config(kind, source, **hints[kind]))
    source_name = checkpoint.layout + (f" {checkpoint.generation}" if checkpoint.generation else "")
    return write_native(
        dst,
        **models,
        text_encoder=checkpoint if "text_encoder" in components else None,
        **manifest_fields(checkpoint),
        source=f"converted from {source_name}",
        dtype=dtype,
        overwrite=overwrite,
    )
