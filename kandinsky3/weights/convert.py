"""Convert original or diffusers checkpoints to the native layout, tensor by tensor.

Every tensor is read from its (memory-mapped or positioned-read) source, cast, written with
:func:`kandinsky3.weights.safe_io.write_safetensors`, and released before the next one, so peak memory stays near
the largest single tensor plus the interpreter, whatever the checkpoint size (``benchmarks/convert_memory.py``
measures it). Names and shapes are checked against the target networks before anything is written; the manifest
``kandinsky3.json`` is written last, so an interrupted conversion never looks like a complete native folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kandinsky3.weights.build import parse_dtype, resolve_config
from kandinsky3.weights.loading import COMPONENTS, open_checkpoint, prepare_output
from kandinsky3.weights.native import CONDITIONING_FILE, write_component, write_conditioning, write_manifest
from kandinsky3.weights.sources import ModelSource
from kandinsky3.weights.t5 import copy_tokenizer_files, load_t5_config, t5_weight_source, write_t5

__all__ = ["convert"]

logger = logging.getLogger(__name__)


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
    are used only where a config is inferred from an original file. Returns ``dst``.
    """
    dst, dtype = Path(dst), parse_dtype(dtype)
    checkpoint = open_checkpoint(src, variant=variant, components=tuple(components), t5_path=t5_path)
    prepare_output(dst, overwrite)
    infer = {"unet": dict(head_dim=head_dim, groups=groups), "movq": dict(norm_groups=norm_groups)}
    for kind, opener in (("unet", checkpoint.unet_source), ("movq", checkpoint.movq_source)):
        if kind in components:
            source = opener()
            config = resolve_config(kind, source, **infer[kind])
            logger.info("converting %s from %s", kind, source.tensors.path)
            write_component(dst / kind, kind, ModelSource(source.tensors, config), dtype)
    conditioning = checkpoint.conditioning
    if "text_encoder" in components:
        text = checkpoint.text_source()
        conditioning = text.style
        target = dst / "text_encoder"
        logger.info("converting the T5 encoder from %s", text.t5_folder)
        weights = t5_weight_source(Path(text.t5_folder), text.t5_variant)
        write_t5(target, load_t5_config(Path(text.t5_folder)), weights, dtype)
        copy_tokenizer_files(Path(text.tokenizer_folder), target)
        write_conditioning(target / CONDITIONING_FILE, text.conditioning, dtype)
    source_name = checkpoint.layout + (f" {checkpoint.generation}" if checkpoint.generation else "")
    write_manifest(
        dst,
        conditioning=conditioning,
        variant=checkpoint.variant,
        components=list(components),
        scheduler_config=checkpoint.scheduler_config,
        source=f"converted from {source_name}",
    )
    return dst
