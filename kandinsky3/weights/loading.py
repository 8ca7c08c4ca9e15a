"""Public loaders: detect the checkpoint layout, build the networks, and save the native layout.

Accepted ``path`` values (every loader detects the layout by itself):

- a folder with ``model_index.json``: diffusers layout (:mod:`kandinsky3.weights.diffusers`);
- a folder with ``kandinsky3.json``: native layout (:mod:`kandinsky3.weights.native`);
- a folder with ``weights/kandinsky3*.pt``: original 3.0 / 3.1 layout (:mod:`kandinsky3.weights.original`);
- for :func:`load_unet` / :func:`load_movq` also one component: a ``.pt`` file (an original U-Net container or a flat
  MoVQ state dict), a ``.safetensors`` file (config from a ``config.json`` beside it, else inferred from the
  shapes), or a component folder (``config.json`` + ``model.safetensors`` or diffusers weights);
- a Hub repo id ``owner/name`` that is not a local path (:mod:`kandinsky3.weights.hub`).

dtype None keeps the stored dtype; otherwise floating tensors are cast one at a time while loading.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kandinsky3.models.movq import MoVQ
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.models.unet import UNet
from kandinsky3.weights import hub
from kandinsky3.weights.build import build_text_encoder, instantiate, parse_dtype, resolve_config
from kandinsky3.weights.diffusers import (
    DiffusersCheckpoint,
    is_diffusers_folder,
    movq_from_diffusers,
    read_json,
    unet_from_diffusers,
)
from kandinsky3.weights.native import (
    CONDITIONING_FILE,
    NativeCheckpoint,
    is_native_folder,
    read_component,
    write_component,
    write_conditioning,
    write_manifest,
)
from kandinsky3.weights.original import OriginalCheckpoint, is_original_folder, read_flat_file, read_unet_container
from kandinsky3.weights.safe_io import CheckpointError
from kandinsky3.weights.sources import DictSource, ModelSource, SafetensorsSource
from kandinsky3.weights.t5 import write_t5
from kandinsky3.weights.t5_stream import is_streamed

__all__ = [
    "COMPONENTS",
    "Components",
    "open_checkpoint",
    "load_unet",
    "load_movq",
    "load_text_encoder",
    "load_components",
    "save_native",
]

COMPONENTS = ("unet", "movq", "text_encoder")
Checkpoint = OriginalCheckpoint | DiffusersCheckpoint | NativeCheckpoint
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class Components:
    """Loaded networks (None where not requested) and how to condition them.

    ``conditioning`` is "original" (null-embedding unconditional context, SPEC §4.5) or "diffusers" (no null
    embedding); ``layout`` is "original", "diffusers" or "native"; ``generation`` is "3.0"/"3.1" for original
    checkpoints, else None; ``scheduler_config`` is the diffusers scheduler config when the checkpoint has one.
    """

    unet: UNet | None
    movq: MoVQ | None
    text_encoder: TextEncoder | None
    conditioning: str
    scheduler_config: dict[str, Any] | None
    layout: str
    variant: str
    generation: str | None = None


def open_checkpoint(
    path: str | Path,
    *,
    variant: str | None = None,
    components: tuple[str, ...] = COMPONENTS,
    t5_path: str | Path | None = None,
    prefer_fp16: bool = False,
) -> Checkpoint:
    """Detect the layout of a checkpoint folder (or resolve a Hub repo id) and open it lazily."""
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    if hub.is_repo_id(str(path)):
        path = hub.resolve(str(path), components=tuple(components), variant=variant)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such checkpoint folder (and not a Hub repo id owner/name)")
    if not root.is_dir():
        raise CheckpointError(
            root, "a whole-model checkpoint must be a folder (single files work with load_unet/load_movq)"
        )
    if is_diffusers_folder(root):
        return DiffusersCheckpoint(root, variant, prefer_fp16=prefer_fp16)
    if is_native_folder(root):
        return NativeCheckpoint(root, variant)
    if is_original_folder(root):
        return OriginalCheckpoint(root, variant, t5_path=t5_path, t5_resolver=hub.resolve_t5)
    raise CheckpointError(
        root, "is not a Kandinsky 3 checkpoint: expected model_index.json (diffusers), kandinsky3.json (native) "
        "or weights/kandinsky3*.pt (original)"
    )


def _component_source(path: Path, kind: str) -> ModelSource | None:
    """A single-component file or folder as a source, or None when ``path`` is a whole-model folder."""
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            return ModelSource(read_unet_container(path).unet if kind == "unet" else read_flat_file(path))
        if path.suffix != ".safetensors":
            raise CheckpointError(path, f"is not a {kind} checkpoint file (.pt, .bin or .safetensors)")
        folder = path.parent
    elif (path / "config.json").is_file():
        folder = path
    else:
        return None
    config = folder / "config.json"
    if not config.is_file():
        return ModelSource(SafetensorsSource(path))  # original key names, config inferred from the shapes
    if "_class_name" in read_json(config):  # a diffusers component folder
        fp16 = ".fp16." in path.name
        return unet_from_diffusers(folder, fp16)[0] if kind == "unet" else movq_from_diffusers(folder, fp16)
    return read_component(folder, kind, path if path.is_file() else None)


def _model_source(path: str | Path, kind: str, variant: str | None) -> ModelSource:
    if not hub.is_repo_id(str(path)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such checkpoint file or folder (and not a Hub repo id owner/name)")
        source = _component_source(Path(path), kind)
        if source is not None:
            return source
    checkpoint = open_checkpoint(path, variant=variant, components=(kind,))
    return checkpoint.unet_source() if kind == "unet" else checkpoint.movq_source()


def load_unet(
    path: str | Path,
    *,
    variant: str | None = None,
    config=None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    head_dim: int = 64,
    groups: int = 32,
) -> UNet:
    """Load a U-Net in eval mode. ``variant`` ("base", "flash", "inpainting") picks the original file (default
    base). ``config`` overrides the checkpoint's; ``head_dim``/``groups`` are used only when the config is inferred
    from an original file's shapes."""
    source = _model_source(path, "unet", variant)
    config = resolve_config("unet", source, config, head_dim=head_dim, groups=groups)
    return instantiate("unet", config, source.tensors, dtype=parse_dtype(dtype), device=device)


def load_movq(
    path: str | Path,
    *,
    config=None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    norm_groups: int = 32,
) -> MoVQ:
    """Load the MoVQ autoencoder in eval mode (``norm_groups`` only when the config is inferred)."""
    source = _model_source(path, "movq", None)
    config = resolve_config("movq", source, config, norm_groups=norm_groups)
    return instantiate("movq", config, source.tensors, dtype=parse_dtype(dtype), device=device)


def load_text_encoder(
    path: str | Path,
    *,
    variant: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    t5_path: str | Path | None = None,
    stream_t5: bool | str = False,
    t5_prefetch: bool = True,
) -> TextEncoder:
    """Load T5 + tokenizer + the variant's projection (+ null embedding in the original and native layouts).

    ``t5_path`` replaces the T5 folder of an original checkpoint (3.0 reads ``google/flan-ul2`` otherwise).
    ``stream_t5`` (True / "auto" / False) runs T5 block by block from its files, see :func:`build_text_encoder`.
    """
    checkpoint = open_checkpoint(path, variant=variant, components=("text_encoder",), t5_path=t5_path)
    return build_text_encoder(checkpoint.text_source(), dtype=parse_dtype(dtype), device=device, stream_t5=stream_t5,
                              t5_prefetch=t5_prefetch)


def load_components(
    path: str | Path,
    *,
    variant: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    components: tuple[str, ...] = COMPONENTS,
    t5_path: str | Path | None = None,
    unet_config=None,
    movq_config=None,
    head_dim: int = 64,
    groups: int = 32,
    norm_groups: int = 32,
    stream_t5: bool | str = False,
    t5_prefetch: bool = True,
) -> Components:
    """Load several components of one checkpoint folder or Hub repo; the others are None.

    ``unet_config``/``movq_config`` override the checkpoint's configs; ``head_dim``, ``groups`` (U-Net) and
    ``norm_groups`` (MoVQ) are used only when a config is inferred from an original file's shapes. ``stream_t5``
    (True / "auto" / False) runs T5 block by block from its files (:mod:`kandinsky3.weights.t5_stream`), reading
    the next block meanwhile unless ``t5_prefetch=False``.
    """
    checkpoint = open_checkpoint(path, variant=variant, components=tuple(components), t5_path=t5_path)
    dtype = parse_dtype(dtype)
    built: dict[str, Any] = {name: None for name in COMPONENTS}
    plans = (
        ("unet", checkpoint.unet_source, unet_config, dict(head_dim=head_dim, groups=groups)),
        ("movq", checkpoint.movq_source, movq_config, dict(norm_groups=norm_groups)),
    )
    for kind, opener, config, hints in plans:
        if kind in components:
            source = opener()
            config = resolve_config(kind, source, config, **hints)
            built[kind] = instantiate(kind, config, source.tensors, dtype=dtype, device=device)
    conditioning = checkpoint.conditioning
    if "text_encoder" in components:
        text = checkpoint.text_source()
        conditioning = text.style
        built["text_encoder"] = build_text_encoder(text, dtype=dtype, device=device, stream_t5=stream_t5,
                                                   t5_prefetch=t5_prefetch)
    return Components(
        **built,
        conditioning=conditioning,
        scheduler_config=checkpoint.scheduler_config,
        layout=checkpoint.layout,
        variant=checkpoint.variant,
        generation=checkpoint.generation,
    )


def prepare_output(folder: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless ``overwrite`` (then it is emptied first)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def save_native(
    components: Components, folder: str | Path, dtype: str | torch.dtype | None = None, *, overwrite: bool = False
) -> Path:
    """Write the loaded networks of ``components`` in the native layout (floating tensors cast to ``dtype``)."""
    folder, dtype = Path(folder), parse_dtype(dtype)
    prepare_output(folder, overwrite)
    saved = []
    for kind in ("unet", "movq"):
        model = getattr(components, kind)
        if model is not None:
            write_component(folder / kind, kind, ModelSource(DictSource(model.state_dict(), None), model.config), dtype)
            saved.append(kind)
    encoder = components.text_encoder
    if encoder is not None:
        target = folder / "text_encoder"
        if is_streamed(encoder.t5):
            raise ValueError("this text encoder streams its T5 from disk and holds no weights to save; load it with "
                             "stream_t5=False, or convert the checkpoint folder with `kandinsky3 convert`")
        write_t5(target, encoder.t5.config, DictSource(encoder.t5.state_dict(), None), dtype)
        encoder.tokenizer.save_pretrained(str(target))
        conditioning = {f"projection.{key}": value for key, value in encoder.projection.state_dict().items()}
        if components.conditioning == "original":
            conditioning["null_embedding"] = encoder.null_embedding.detach()
        write_conditioning(target / CONDITIONING_FILE, conditioning, dtype)
        saved.append("text_encoder")
    write_manifest(
        folder,
        conditioning=components.conditioning,
        variant=components.variant,
        components=saved,
        scheduler_config=components.scheduler_config,
        source=f"save_native from {components.layout}",
    )
    return folder
