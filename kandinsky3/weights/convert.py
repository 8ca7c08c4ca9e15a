"""Convert original or diffusers checkpoints to the native layout, tensor by tensor.

Every tensor is read from its (memory-mapped or positioned-read) source, cast, written with
:func:`kandinsky3.weights.safe_io.write_safetensors`, and released before the next one, so peak memory stays near
the largest single tensor plus the interpreter, whatever the checkpoint size (``benchmarks/convert_memory.py``
measures it). The writing is :func:`kandinsky3.weights.native.write_native`'s: names and shapes are checked against
the target networks, the folder appears under its name only when complete, and an existing one is replaced only
when it holds nothing but a model kandinsky3 wrote. The destination must lie apart from everything the checkpoint
is read from (:func:`_check_apart`): replacing it must never delete or change the source.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kandinsky3.components import COMPONENTS
from kandinsky3.weights.build import resolve_config
from kandinsky3.weights.loading import open_checkpoint
from kandinsky3.weights.native import DestinationError, check_destination, manifest_fields, write_native
from kandinsky3.weights.sources import ModelSource, TextSource

__all__ = ["convert"]


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    variant: str | None = None,
    dtype: str | torch.dtype | None = None,
    components: tuple[str, ...] | None = None,
    t5_path: str | Path | None = None,
    overwrite: bool = False,
    head_dim: int = 64,
    groups: int = 32,
    norm_groups: int = 32,
) -> Path:
    """Write ``components`` of the checkpoint ``src`` (folder or Hub repo id) to the native folder ``dst``.

    ``variant`` picks the original files (base, flash, inpainting); ``dtype`` ("fp16", "bf16", "fp32" or None to
    keep) applies to floating tensors (T5's ``wo`` stays fp32 under fp16). ``components`` None means all three, or
    for a native source the ones it holds (a MoVQ run's ``final/`` holds only ``movq``).
    ``head_dim``/``groups``/``norm_groups`` are used only where a config is inferred from an original file. The
    source's conditioning, scheduler config and sampling defaults are kept. A ``dst`` that overlaps the source, or
    that ``write_native`` may not replace, is a :class:`DestinationError` raised before anything is written.
    Returns ``dst``.
    """
    wanted = tuple(components or COMPONENTS)
    checkpoint = open_checkpoint(src, variant=variant, components=wanted, t5_path=t5_path)
    if components is None:
        components = tuple(checkpoint.manifest["components"]) if checkpoint.layout == "native" else COMPONENTS
    dst = Path(dst)
    _check_apart(dst, [checkpoint.root] + ([Path(t5_path)] if t5_path is not None else []))
    check_destination(dst, overwrite)  # before any config is inferred
    hints = {"unet": dict(head_dim=head_dim, groups=groups), "movq": dict(norm_groups=norm_groups)}
    models = {}
    for kind, opener in (("unet", checkpoint.unet_source), ("movq", checkpoint.movq_source)):
        if kind in components:
            source = opener()
            models[kind] = ModelSource(source.tensors, resolve_config(kind, source, **hints[kind]))
    text = checkpoint.text_source() if "text_encoder" in components else None
    _check_apart(dst, _paths_read(models, text))  # the files themselves, wherever links lead
    source_name = checkpoint.layout + (f" {checkpoint.generation}" if checkpoint.generation else "")
    return write_native(
        dst,
        **models,
        text_encoder=text,
        **manifest_fields(checkpoint),
        source=f"converted from {source_name}",
        dtype=dtype,
        overwrite=overwrite,
    )


def _check_apart(dst: Path, sources: list[Path]) -> None:
    """Raise a :class:`DestinationError` when ``dst`` is one of ``sources`` (files or folders), lies inside one, or
    contains one, links resolved: writing there would change the source, and replacing it would delete it."""
    target = dst.resolve()
    for source in sources:
        real = Path(source).resolve()
        relation = ("is" if target == real else "lies inside" if real in target.parents
                    else "contains" if target in real.parents else None)
        if relation is not None:
            where = "" if real == Path(source).absolute() else f" ({real})"
            raise DestinationError(f"the destination {dst} {relation} the source {source}{where}; "
                                   f"choose a destination outside the checkpoint being converted")


def _paths_read(models: dict[str, ModelSource], text: TextSource | None) -> list[Path]:
    """The weight files a conversion reads, and the text encoder's folders with every file in them."""
    paths = [Path(model.tensors.path) for model in models.values() if model.tensors.path is not None]
    if text is not None:
        folders = {Path(text.t5_folder), Path(text.tokenizer_folder)}
        paths += [*folders, *(path for folder in folders for path in folder.iterdir() if path.is_file())]
        paths += map(Path, text.conditioning_files)
    return paths
