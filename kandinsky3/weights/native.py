"""The native kandinsky3 layout: the one reader and the one writer of model folders.

::

    kandinsky3.json              {"format": "kandinsky3", "format_version": 1, "conditioning": "original"|"diffusers",
                                  "variant": "base"|"flash"|"inpainting", "components": [...],
                                  "sampling_defaults": {"width": W, "height": H, optional "guidance_scale",
                                  "steps", "sampler"}, optional "scheduler_config" (kept from a diffusers source)
                                  and "source"}
    unet/config.json             UNetConfig.to_dict()
    unet/model.safetensors       original key names (docs/architecture.md §2.10)
    movq/config.json             MoVQConfig.to_dict()
    movq/model.safetensors       original key names (docs/architecture.md §3.4)
    text_encoder/                T5EncoderModel config.json + model.safetensors, tokenizer files
    text_encoder/conditioning.safetensors   projection.{0.weight,1.weight,1.bias} [+ null_embedding]

A folder holds any non-empty subset of the components (a MoVQ run exports only ``movq/``). Folders written
before ``sampling_defaults`` existed read as 1024×1024, the released models' size.

Reading: :class:`NativeCheckpoint` opens a whole folder; :func:`read_component` and :func:`read_text_folder` read
one component folder. Writing: :func:`write_native`, from networks in memory, state dicts or another checkpoint's
lazy sources, used by the converter, ``save_native`` and the trainers. It fills a temporary folder beside the
target and renames it into place when complete: an interrupted write leaves nothing under the target's name, and
an existing target is replaced only once its successor is complete. A target is replaced only when asked to
(``overwrite``) and only when it holds nothing but the files listed above (:func:`check_destination`): a folder
with anything else in it, a file or a link is never deleted. Configs load with ``from_dict``, which rejects
unknown and missing keys; weights are written one tensor at a time
(:func:`kandinsky3.weights.safe_io.write_safetensors`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from kandinsky3.components import COMPONENTS, SamplingDefaults, parse_dtype
from kandinsky3.errors import UsageError
from kandinsky3.lowmem.storage import is_streamed
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.weights.build import KINDS, cast, expected_shapes, resolve_config
from kandinsky3.weights.diffusers import read_json
from kandinsky3.weights.original import VARIANTS
from kandinsky3.weights.safe_io import CheckpointError, check_shapes, write_safetensors
from kandinsky3.weights.sources import Checkpoint, DictSource, ModelSource, SafetensorsSource, TensorSource, TextSource
from kandinsky3.weights.t5 import TOKENIZER_FILES, copy_tokenizer_files, load_t5_config, t5_weight_source, write_t5

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "CONDITIONING_FILE",
    "is_native_folder",
    "read_manifest",
    "read_component",
    "read_text_folder",
    "NativeCheckpoint",
    "DestinationError",
    "check_destination",
    "manifest_fields",
    "write_native",
]

logger = logging.getLogger(__name__)

FORMAT = "kandinsky3"
FORMAT_VERSION = 1
MANIFEST = "kandinsky3.json"
CONDITIONING_FILE = "conditioning.safetensors"
CONDITIONINGS = ("original", "diffusers")
_REQUIRED = ("format", "format_version", "conditioning", "variant", "components")
_OPTIONAL = ("sampling_defaults", "scheduler_config", "source")
# Every path write_native creates inside a model folder (the component folders themselves aside).
_WRITTEN = frozenset({
    MANIFEST,
    *(f"{kind}/{name}" for kind in ("unet", "movq") for name in ("config.json", "model.safetensors")),
    *(f"text_encoder/{name}" for name in ("config.json", "model.safetensors", CONDITIONING_FILE, *TOKENIZER_FILES)),
})

# What write_native accepts for one component (see its docstring).
ModelWeights = Union[nn.Module, tuple[Any, Mapping[str, torch.Tensor]], ModelSource, Checkpoint]
TextWeights = Union[TextEncoder, tuple[TextEncoder, Mapping[str, torch.Tensor]], TextSource, Checkpoint]


# --------------------------------------------------------------------------------------------------- reading


def is_native_folder(root: Path) -> bool:
    return (root / MANIFEST).is_file()


def _check_manifest(data: dict[str, Any], where: Path | None) -> None:
    """Raise a CheckpointError naming ``where`` unless ``data`` is a valid manifest."""
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    missing = sorted(set(_REQUIRED) - set(data))
    if unknown or missing:
        raise CheckpointError(where, f"unknown keys {unknown}, missing keys {missing}")
    if data["format"] != FORMAT or data["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            where,
            f"format {data['format']!r} version {data['format_version']!r}; this code reads "
            f"{FORMAT!r} version {FORMAT_VERSION}",
        )
    if data["conditioning"] not in CONDITIONINGS or data["variant"] not in VARIANTS:
        raise CheckpointError(where, f"bad conditioning {data['conditioning']!r} or variant {data['variant']!r}")
    if not data["components"] or not set(data["components"]) <= set(COMPONENTS):
        raise CheckpointError(
            where, f"components {data['components']} are not a non-empty subset of {list(COMPONENTS)}"
        )


def read_manifest(root: Path) -> dict[str, Any]:
    """Read and validate ``kandinsky3.json``; unknown or missing keys are an error."""
    path = root / MANIFEST
    data = read_json(path)
    _check_manifest(data, path)
    return data


def read_component(folder: Path, kind: str, weights: Path | None = None) -> ModelSource:
    """``folder/config.json`` (from_dict) + ``folder/model.safetensors`` (or ``weights``) of a "unet"/"movq"."""
    config_path = folder / "config.json"
    try:
        config = KINDS[kind][1].from_dict(read_json(config_path))
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(config_path, str(error)) from None
    return ModelSource(SafetensorsSource(weights or folder / "model.safetensors"), config)


def read_text_folder(folder: Path) -> TextSource:
    """A native ``text_encoder/`` folder: T5 + tokenizer, projection (+ null embedding) from its conditioning file."""
    source = SafetensorsSource(folder / CONDITIONING_FILE)
    conditioning = {key: source[key] for key in source}
    return TextSource(folder, folder, conditioning, conditioning_files=[source.path])


class NativeCheckpoint(Checkpoint):
    """A native folder; ``variant`` (if given) must match the one it records."""

    layout = "native"

    def __init__(self, root: str | Path, variant: str | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if variant is not None and variant != self.manifest["variant"]:
            raise CheckpointError(
                self.root, f"holds the {self.manifest['variant']!r} variant, but variant {variant!r} was requested"
            )
        self.variant = self.manifest["variant"]
        self.conditioning = self.manifest["conditioning"]
        self.scheduler_config = self.manifest.get("scheduler_config")
        recorded = self.manifest.get("sampling_defaults")
        try:
            self.sampling_defaults = SamplingDefaults() if recorded is None else SamplingDefaults.from_dict(recorded)
        except (TypeError, ValueError) as error:
            raise CheckpointError(self.root / MANIFEST, str(error)) from None

    def _require(self, component: str) -> Path:
        if component not in self.manifest["components"]:
            present = self.manifest["components"]
            raise CheckpointError(self.root / MANIFEST, f"this folder has no {component} (it has {present})")
        return self.root / component

    def unet_source(self) -> ModelSource:
        return read_component(self._require("unet"), "unet")

    def movq_source(self) -> ModelSource:
        return read_component(self._require("movq"), "movq")

    def text_source(self) -> TextSource:
        text = read_text_folder(self._require("text_encoder"))
        if text.style != self.conditioning:
            raise CheckpointError(
                text.conditioning_files[0],
                f"conditioning {self.conditioning!r} in {MANIFEST} does not match the tensors "
                f"{sorted(text.conditioning)}",
            )
        return text


# --------------------------------------------------------------------------------------------------- writing


def manifest_fields(model: Any) -> dict[str, Any]:
    """``conditioning``, ``variant``, ``sampling_defaults`` and ``scheduler_config`` of an opened checkpoint or of
    loaded ``Components``, as :func:`write_native` keywords: what a copy of the model keeps."""
    return {name: getattr(model, name) for name in ("conditioning", "variant", "sampling_defaults", "scheduler_config")}


def write_native(
    folder: str | Path,
    *,
    unet: ModelWeights | None = None,
    movq: ModelWeights | None = None,
    text_encoder: TextWeights | None = None,
    conditioning: str = "original",
    variant: str = "base",
    sampling_defaults: SamplingDefaults | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    source: str | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a native model folder holding the components given (at least one); returns ``folder``.

    Each of ``unet`` / ``movq`` is a network (its ``config`` and ``state_dict()`` are written), a pair
    ``(network or its config, state dict)`` (e.g. weights gathered from FSDP shards with a full state dict), a
    :class:`ModelSource` (lazy tensors + config; config None: inferred from the shapes), or an opened
    :class:`Checkpoint` to copy the component from, tensor by tensor. ``text_encoder`` is a :class:`TextEncoder`,
    a pair ``(TextEncoder, its full state dict)`` (T5 config and tokenizer from the module, tensors from the dict),
    a :class:`TextSource`, or a :class:`Checkpoint`. ``conditioning`` ("original" keeps the null embedding,
    "diffusers" has none) must match a copied text encoder's. ``sampling_defaults`` None records 1024×1024.
    ``dtype`` ("fp16", "bf16", "fp32", a torch dtype, or None to keep) applies to floating tensors; T5's ``wo``
    stays fp32 under fp16. An existing ``folder`` is replaced only as :func:`check_destination` allows (a
    non-empty one needs ``overwrite``); otherwise a :class:`DestinationError` is raised before anything is written.
    """
    folder, dtype = Path(folder), parse_dtype(dtype)
    given = {"unet": unet, "movq": movq, "text_encoder": text_encoder}
    present = [name for name in COMPONENTS if given[name] is not None]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "conditioning": conditioning, "variant": variant,
        "components": present, "sampling_defaults": (sampling_defaults or SamplingDefaults()).to_dict(),
    }
    if scheduler_config is not None:
        manifest["scheduler_config"] = dict(scheduler_config)
    if source is not None:
        manifest["source"] = source
    _check_manifest(manifest, None)
    check_destination(folder, overwrite)
    models = {kind: _model_source(kind, given[kind]) for kind in ("unet", "movq") if given[kind] is not None}
    text = None if text_encoder is None else _text_parts(text_encoder, conditioning)
    with _staging(folder, overwrite) as staging:
        for kind, model in models.items():
            logger.info("writing %s (from %s)", kind, model.tensors.path or "memory")
            _write_component(staging / kind, kind, model, dtype)
        if text is not None:
            logger.info("writing the text encoder (T5 from %s)", text.t5.path or "memory")
            _write_text_folder(staging / "text_encoder", text, dtype)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _model_source(kind: str, value: ModelWeights) -> ModelSource:
    """A "unet"/"movq" argument of :func:`write_native` as lazy tensors with a config."""
    network, config_type = KINDS[kind]
    if isinstance(value, Checkpoint):
        value = value.unet_source() if kind == "unet" else value.movq_source()
    if isinstance(value, ModelSource):
        return ModelSource(value.tensors, resolve_config(kind, value))
    if isinstance(value, network):
        return ModelSource(DictSource(value.state_dict(), None), value.config)
    if isinstance(value, tuple) and len(value) == 2:
        config = value[0].config if isinstance(value[0], network) else value[0]
        if isinstance(config, config_type):
            return ModelSource(DictSource(value[1], None), config)
    raise TypeError(
        f"{kind} must be a {network.__name__}, a ({network.__name__} or {config_type.__name__}, state dict) pair, "
        f"a ModelSource or an opened checkpoint; got {type(value).__name__}"
    )


def _write_component(folder: Path, kind: str, source: ModelSource, dtype: torch.dtype | None) -> None:
    """Stream a "unet" or "movq" source (its ``config`` set) into ``folder``; floating tensors -> dtype."""
    expected = expected_shapes(kind, source.config)
    tensors = source.tensors
    check_shapes(tensors.shapes(), expected, tensors.path, {"unet": "U-Net", "movq": "MoVQ"}[kind])
    layout = {}
    for key, shape in expected.items():
        stored = tensors.meta(key)[1]
        layout[key] = (shape, dtype if (dtype is not None and stored.is_floating_point) else stored)

    def fetch(key: str) -> torch.Tensor:
        tensor = cast(tensors[key], layout[key][1])
        tensors.release(key)
        return tensor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(source.config.to_dict(), indent=2) + "\n")
    write_safetensors(folder / "model.safetensors", layout, fetch, {"format": "pt", "kandinsky3": kind})


@dataclass
class _TextParts:
    """What ``text_encoder/`` is written from: T5 config and tensors, a tokenizer (an object with
    ``save_pretrained`` or a folder whose tokenizer files are copied) and the conditioning tensors."""

    t5_config: Any
    t5: TensorSource
    tokenizer: Any
    conditioning: dict[str, torch.Tensor]


def _text_parts(value: TextWeights, conditioning: str) -> _TextParts:
    if isinstance(value, Checkpoint):
        value = value.text_source()
    if isinstance(value, TextSource):
        if value.style != conditioning:
            raise ValueError(f"the text encoder has {value.style!r} conditioning, but {conditioning!r} was asked for")
        folder = Path(value.t5_folder)
        return _TextParts(load_t5_config(folder), t5_weight_source(folder, value.t5_variant),
                          Path(value.tokenizer_folder), dict(value.conditioning))
    encoder, state = value if isinstance(value, tuple) else (value, None)
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"text_encoder must be a TextEncoder, a (TextEncoder, state dict) pair, a TextSource or an "
                        f"opened checkpoint; got {type(encoder).__name__}")
    if state is None:
        if is_streamed(encoder.t5):
            raise ValueError("this text encoder streams its T5 from disk and holds no weights to save; load it with "
                             "stream_t5=False, or convert the checkpoint folder with `kandinsky3 convert`")
        state = encoder.state_dict()
    kept = {key: state[key] for key in state if key.startswith("projection.")}
    if conditioning == "original":
        kept["null_embedding"] = state["null_embedding"]
    t5 = DictSource({key[len("t5."):]: tensor for key, tensor in state.items() if key.startswith("t5.")}, None)
    return _TextParts(encoder.t5.config, t5, encoder.tokenizer, kept)


def _write_text_folder(folder: Path, text: _TextParts, dtype: torch.dtype | None) -> None:
    """T5 config + weights, tokenizer files and ``conditioning.safetensors`` (null embedding as a (C,) vector)."""
    write_t5(folder, text.t5_config, text.t5, dtype)
    if isinstance(text.tokenizer, Path):
        copy_tokenizer_files(text.tokenizer, folder)
    else:
        text.tokenizer.save_pretrained(str(folder))
    tensors = {}
    for key, value in text.conditioning.items():
        value = value.reshape(-1) if key == "null_embedding" else value
        tensors[key] = cast(value.detach(), dtype).contiguous()
    layout = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
    write_safetensors(folder / CONDITIONING_FILE, layout, tensors.__getitem__, {"format": "pt"})


class DestinationError(UsageError, FileExistsError):
    """A model folder cannot be written where asked: the destination exists (and ``overwrite`` was not given),
    holds something kandinsky3 did not write, or overlaps the checkpoint being read."""


def check_destination(folder: Path, overwrite: bool) -> None:
    """Raise a :class:`DestinationError` unless :func:`write_native` may put a model folder at ``folder``: it does
    not exist, or it is an empty folder, or (with ``overwrite``) a folder holding only what ``write_native``
    writes. A file, a link, or a folder with anything else in it (a few of those entries are named) is never
    replaced; nor, without ``overwrite``, a non-empty folder."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        kind = "a link" if folder.is_symlink() else "a file"
        raise DestinationError(f"{folder} is {kind}, not a model folder; choose another destination")
    if not folder.exists():
        return
    foreign = _foreign_entries(folder)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DestinationError(f"{folder} holds files kandinsky3 did not write ({listed}), which it never deletes; "
                               f"choose another destination or move them away")
    if not overwrite and any(folder.iterdir()):
        raise DestinationError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _foreign_entries(folder: Path) -> list[str]:
    """Paths under ``folder`` (relative, sorted; a foreign folder as ``name/``, its contents unlisted) that are not
    what write_native writes. Links are not followed: a linked component (``movq -> ../base/movq``) is one entry,
    and replacing the folder removes the link, never what it points to."""
    foreign = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in sorted(files):
            if (base / name).as_posix() not in _WRITTEN:
                foreign.append((base / name).as_posix())
        for name in sorted(dirs):
            if base != Path(".") or name not in COMPONENTS:
                foreign.append((base / name).as_posix() + "/")
        dirs[:] = [name for name in dirs if base == Path(".") and name in COMPONENTS]
    return sorted(foreign)


def _remove_stale_staging(folder: Path) -> None:
    """Delete the ``.NAME.partial-PID-*`` staging folders of writes to ``folder`` whose process no longer runs (one
    killed mid-write, e.g. by SIGKILL, could not clean up). Only this writer's own half-written folders match; a
    ``.NAME.previous-*`` folder (a model moved aside when its process died) is left for the user, with a warning."""
    for stale in sorted(folder.parent.glob(f".{folder.name}.partial-*")):
        pid = stale.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if stale.is_dir() and not stale.is_symlink() and pid.isdigit() and not _process_alive(int(pid)):
            logger.info("removing %s, left by an interrupted write (process %s has ended)", stale, pid)
            shutil.rmtree(stale, ignore_errors=True)
    for moved in folder.parent.glob(f".{folder.name}.previous-*"):
        logger.warning("%s holds a model moved aside by an interrupted write; it is left as it is", moved)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _staging(folder: Path, overwrite: bool) -> Iterator[Path]:
    """A new folder beside ``folder`` to write into. On success it takes ``folder``'s place (a previous ``folder``,
    checked again by :func:`check_destination`, is moved aside first and deleted last); on error it is removed and
    ``folder`` is left as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(folder)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = folder.with_name(f".{folder.name}.partial-{tag}")
    staging.mkdir()
    try:
        yield staging
        check_destination(folder, overwrite)  # again: files may have appeared there while this was written
        previous = folder.with_name(f".{folder.name}.previous-{tag}") if folder.exists() else None
        if previous is not None:
            folder.rename(previous)
        try:
            staging.rename(folder)
        except BaseException:
            if previous is not None:
                previous.rename(folder)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous)
