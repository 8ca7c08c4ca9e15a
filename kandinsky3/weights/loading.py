"""Public loaders: detect the checkpoint layout once, build the networks from it, and save the native layout.

Accepted ``path`` values:

- a folder with ``model_index.json``: diffusers layout (:mod:`kandinsky3.weights.diffusers`);
- a folder with ``kandinsky3.json``: native layout (:mod:`kandinsky3.weights.native`);
- a folder with ``weights/kandinsky3*.pt``: original 3.0 / 3.1 layout (:mod:`kandinsky3.weights.original`);
- a Hub repo id ``owner/name`` that is not a local path (:mod:`kandinsky3.weights.hub`);
- a checkpoint already opened with :func:`open_checkpoint`: the layout is detected (and a Hub repo resolved)
  once, and every component is then built from the same object;
- for :func:`load_unet` / :func:`load_movq` also one component: a ``.pt`` file (an original U-Net container or a flat
  MoVQ state dict), a ``.safetensors`` file (config from a ``config.json`` beside it, else inferred from the
  shapes), or a component folder (``config.json`` + ``model.safetensors`` or diffusers weights); for
  :func:`load_text_encoder` a native ``text_encoder/`` folder.

dtype None keeps the stored dtype; otherwise floating tensors are cast one at a time while loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kandinsky3.components import COMPONENTS, SamplingDefaults, parse_dtype
from kandinsky3.models.movq import MoVQ
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.models.unet import UNet
from kandinsky3.weights import hub
from kandinsky3.weights.build import instantiate, instantiate_text_encoder, resolve_config
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
    manifest_fields,
    read_component,
    read_text_folder,
    write_native,
)
from kandinsky3.weights.original import OriginalCheckpoint, is_original_folder, read_flat_file, read_unet_container
from kandinsky3.weights.safe_io import CheckpointError
from kandinsky3.weights.sources import Checkpoint, ModelSource, SafetensorsSource, TextSource

__all__ = [
    "Components",
    "open_checkpoint",
    "component_source",
    "load_unet",
    "load_movq",
    "load_text_encoder",
    "load_components",
    "save_native",
]

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PathOrCheckpoint = str | Path | Checkpoint


@dataclass
class Components:
    """Loaded networks (None where not requested) and how to condition and sample them.

    ``conditioning`` is "original" (null-embedding unconditional context, docs/architecture.md §4.5) or
    "diffusers" (no null embedding); ``layout`` is "original", "diffusers" or "native"; ``generation`` is
    "3.0"/"3.1" for original checkpoints, else None; ``scheduler_config`` is the diffusers scheduler config when the
    checkpoint has one; ``sampling_defaults`` is the size (and, where recorded, guidance, steps, sampler) the model
    renders with when the caller does not say.
    """

    unet: UNet | None
    movq: MoVQ | None
    text_encoder: TextEncoder | None
    conditioning: str
    scheduler_config: dict[str, Any] | None
    layout: str
    variant: str
    generation: str | None = None
    sampling_defaults: SamplingDefaults = SamplingDefaults()


def open_checkpoint(
    path: str | Path,
    *,
    variant: str | None = None,
    components: tuple[str, ...] = COMPONENTS,
    t5_path: str | Path | None = None,
    prefer_fp16: bool = False,
) -> Checkpoint:
    """Detect the layout of a checkpoint folder (or resolve a Hub repo id) and open it lazily.

    ``components`` says which files a Hub repo id must provide (every missing one is listed in one HubError);
    local folders are not checked for them until a component is loaded. ``variant`` None means "base" for
    original folders and "whatever the folder holds" for native ones.
    """
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


def _opened(
    path: PathOrCheckpoint, variant: str | None, components: tuple[str, ...], t5_path: str | Path | None = None
) -> Checkpoint:
    """``path`` itself when it is an opened checkpoint (``variant`` None or the same), else :func:`open_checkpoint`."""
    if not isinstance(path, Checkpoint):
        return open_checkpoint(path, variant=variant, components=components, t5_path=t5_path)
    if variant is not None and variant != path.variant:
        raise CheckpointError(path.root, f"was opened for variant {path.variant!r}, but {variant!r} was requested")
    if t5_path is not None:
        raise ValueError("t5_path is used when a checkpoint is opened: pass it to open_checkpoint")
    return path


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


def component_source(
    path: PathOrCheckpoint, kind: str, variant: str | None = None, *, t5_path: str | Path | None = None
) -> ModelSource | TextSource:
    """Where component ``kind`` ("unet", "movq" or "text_encoder") of ``path`` comes from, as a lazy source (only
    file headers are read): a single-component file or folder (see the module docstring), else that component of
    the whole checkpoint ``path`` (a folder, Hub repo id or opened checkpoint)."""
    if kind not in COMPONENTS:
        raise ValueError(f"unknown component {kind!r}; choose from {list(COMPONENTS)}")
    local = not isinstance(path, Checkpoint) and not hub.is_repo_id(str(path))
    if local and not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder (and not a Hub repo id owner/name)")
    if kind == "text_encoder":
        if local and Path(path, CONDITIONING_FILE).is_file():
            return read_text_folder(Path(path))
        return _opened(path, variant, (kind,), t5_path).text_source()
    source = _component_source(Path(path), kind) if local else None
    if source is not None:
        return source
    checkpoint = _opened(path, variant, (kind,), t5_path)
    return checkpoint.unet_source() if kind == "unet" else checkpoint.movq_source()


def _build(kind: str, source: ModelSource, config: Any, dtype: Any, device: Any, **hints: Any) -> UNet | MoVQ:
    config = resolve_config(kind, source, config, **hints)
    return instantiate(kind, config, source.tensors, dtype=parse_dtype(dtype), device=device)


def load_unet(
    path: PathOrCheckpoint,
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
    source = component_source(path, "unet", variant)
    return _build("unet", source, config, dtype, device, head_dim=head_dim, groups=groups)


def load_movq(
    path: PathOrCheckpoint,
    *,
    config=None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    norm_groups: int = 32,
) -> MoVQ:
    """Load the MoVQ autoencoder in eval mode (``norm_groups`` only when the config is inferred)."""
    source = component_source(path, "movq")
    return _build("movq", source, config, dtype, device, norm_groups=norm_groups)


def load_text_encoder(
    path: PathOrCheckpoint,
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
    ``stream_t5`` (True / "auto" / False) runs T5 block by block from its files, see
    :func:`kandinsky3.weights.build.instantiate_text_encoder`.
    """
    source = component_source(path, "text_encoder", variant, t5_path=t5_path)
    return instantiate_text_encoder(source, dtype=parse_dtype(dtype), device=device, stream_t5=stream_t5,
                                    t5_prefetch=t5_prefetch)


def load_components(
    path: PathOrCheckpoint,
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
    """Load several components of one checkpoint (folder, Hub repo or opened checkpoint); the others are None.

    ``unet_config``/``movq_config`` override the checkpoint's configs; ``head_dim``, ``groups`` (U-Net) and
    ``norm_groups`` (MoVQ) are used only when a config is inferred from an original file's shapes. ``stream_t5``
    (True / "auto" / False) runs T5 block by block from its files (:mod:`kandinsky3.lowmem.t5_stream`), reading
    the next block meanwhile unless ``t5_prefetch=False``.
    """
    checkpoint = _opened(path, variant, tuple(components), t5_path)
    dtype = parse_dtype(dtype)
    built: dict[str, Any] = {name: None for name in COMPONENTS}
    if "unet" in components:
        built["unet"] = _build("unet", checkpoint.unet_source(), unet_config, dtype, device, head_dim=head_dim,
                               groups=groups)
    if "movq" in components:
        built["movq"] = _build("movq", checkpoint.movq_source(), movq_config, dtype, device, norm_groups=norm_groups)
    conditioning = checkpoint.conditioning
    if "text_encoder" in components:
        text = checkpoint.text_source()
        conditioning = text.style
        built["text_encoder"] = instantiate_text_encoder(text, dtype=dtype, device=device, stream_t5=stream_t5,
                                                         t5_prefetch=t5_prefetch)
    return Components(
        **built,
        conditioning=conditioning,
        scheduler_config=checkpoint.scheduler_config,
        layout=checkpoint.layout,
        variant=checkpoint.variant,
        generation=checkpoint.generation,
        sampling_defaults=checkpoint.sampling_defaults,
    )


def save_native(
    components: Components, folder: str | Path, dtype: str | torch.dtype | None = None, *, overwrite: bool = False
) -> Path:
    """Write the loaded networks of ``components`` in the native layout (floating tensors cast to ``dtype``)."""
    return write_native(
        folder, unet=components.unet, movq=components.movq, text_encoder=components.text_encoder,
        **manifest_fields(components), source=f"save_native from {components.layout}", dtype=dtype, overwrite=overwrite,
    )
