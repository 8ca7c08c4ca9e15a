"""Resolve Hugging Face Hub repo ids to local folders, downloading only the files a call needs (practice §7).

Known repos use fixed file lists (so a warm cache works offline):

- ``ai-forever/Kandinsky3.1``: original 3.1 layout (``weights/kandinsky3{,_flash,_inpainting}.pt``, ``movq.pt``,
  ``flan_ul2_encoder/``).
- ``ai-forever/Kandinsky3.0``: original 3.0 layout (base and inpainting); its T5 comes from ``google/flan-ul2``.
- ``kandinsky-community/kandinsky-3``: diffusers layout, fp16 variant files only.

Any other ``owner/name`` that is not an existing local path is listed online to find its layout (offline: whatever
is cached). When files cannot be had (offline, ``HF_HUB_OFFLINE=1``, a missing file, no network) a
:class:`HubError` lists them and says how to download them and pass a local path. ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE`` and ``HF_HOME`` are read at call time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kandinsky3.weights.original import ENCODER_FOLDER, FLAN_UL2, check_variant, projection_file_name, unet_file_name
from kandinsky3.weights.safe_io import CheckpointError, first_line, preview

__all__ = ["KNOWN_REPOS", "HubError", "is_repo_id", "file_patterns", "optional_patterns", "resolve", "resolve_t5"]

KNOWN_REPOS = {
    "ai-forever/Kandinsky3.1": "original-3.1",
    "ai-forever/Kandinsky3.0": "original-3.0",
    "kandinsky-community/kandinsky-3": "diffusers-fp16",
}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_T5_TOKENIZER = [
    "spiece.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"
]


class HubError(CheckpointError):
    """Files of a Hub repo could not be obtained; the message lists them and how to fetch them by hand."""

    def __init__(self, repo_id: str, files: list[str], reason: str):
        includes = " ".join(f"--include '{name}'" for name in files)
        super().__init__(
            None,
            f"could not get {len(files)} file(s) of the Hugging Face Hub repo {repo_id}: {preview(files, 12)} "
            f"({reason}). Download them yourself, e.g.\n    hf download {repo_id} {includes} --local-dir DIR\n"
            "(huggingface-cli download … with older huggingface_hub), then pass DIR as the path.",
        )
        self.repo_id, self.files = repo_id, files


def is_repo_id(path: str | os.PathLike) -> bool:
    """``owner/name`` that is not an existing local path."""
    return isinstance(path, str) and not os.path.exists(path) and _REPO_ID.fullmatch(path) is not None


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any((flag or "").upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _original_patterns(generation: str, components: tuple[str, ...], variant: str) -> list[str]:
    unet = f"weights/{unet_file_name(variant)}"
    files = []
    if "unet" in components:
        files.append(unet)
    if "movq" in components:
        files.append("weights/movq.pt")
    if "text_encoder" in components:
        files.append(unet)  # null embedding (and the 3.0 projection) live in the U-Net file
        if generation == "3.1":
            encoder = f"weights/{ENCODER_FOLDER}"
            files += [f"{encoder}/config.json", f"{encoder}/pytorch_model.bin.index.json",
                      f"{encoder}/pytorch_model-*.bin", f"{encoder}/{projection_file_name(variant)}"]
    return list(dict.fromkeys(files))


def _diffusers_patterns(components: tuple[str, ...], fp16: bool) -> list[str]:
    tag = ".fp16" if fp16 else ""
    files = ["model_index.json", "scheduler/scheduler_config.json"]
    parts = set(components) | ({"unet"} if "text_encoder" in components else set())  # the projection is in the U-Net
    for part in ("unet", "movq"):
        if part in parts:
            files += [f"{part}/config.json", f"{part}/diffusion_pytorch_model{tag}.safetensors"]
    if "text_encoder" in components:
        if fp16:
            files += ["text_encoder/config.json", "text_encoder/model.safetensors.index.fp16.json",
                      "text_encoder/model.fp16-*.safetensors"]
        else:
            files += ["text_encoder/config.json", "text_encoder/model*.safetensors*"]
        files.append("tokenizer/*")
    return files


def optional_patterns(layout: str, components: tuple[str, ...]) -> list[str]:
    """Files downloaded when present but not required one by one (T5 tokenizer files: spiece.model and/or json)."""
    if layout == "original-3.1" and "text_encoder" in components:
        return [f"weights/{ENCODER_FOLDER}/{name}" for name in _T5_TOKENIZER]
    return []


def file_patterns(layout: str, components: tuple[str, ...], variant: str | None) -> list[str]:
    """Files (glob patterns) a layout needs for ``components`` of ``variant``; all of them are required."""
    variant = check_variant(variant)
    if layout.startswith("original-"):
        generation = layout.split("-", 1)[1]
        if generation == "3.0" and variant == "flash":
            raise ValueError("Kandinsky 3.0 has no flash variant (Kandinsky Flash is part of 3.1)")
        return _original_patterns(generation, components, variant)
    if variant != "base":
        raise ValueError(f"the diffusers / native Hub layouts hold one model; variant {variant!r} is not available")
    if layout.startswith("diffusers"):
        return _diffusers_patterns(components, fp16=layout == "diffusers-fp16")
    return ["kandinsky3.json"] + [f"{name}/*" for name in components]


def _missing(folder: Path, patterns: list[str]) -> list[str]:
    return [pattern for pattern in patterns if not any(folder.glob(pattern))]


def _download(repo_id: str, patterns: list[str] | None, required: list[str], revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        folder = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline, cache_dir=_cache_dir()
            )
        )
    except Exception as error:  # network, offline-cache and repository errors all end here
        reason = "HF_HUB_OFFLINE is set and they are not in the cache" if offline else first_line(error)
        raise HubError(repo_id, required or list(patterns or ["*"]), reason) from None
    missing = _missing(folder, required)
    if missing:
        reason = "offline, not in the cache" if offline else "not in the repository"
        raise HubError(repo_id, missing, reason)
    return folder


def _layout_of(files: list[str]) -> str:
    if "model_index.json" in files:
        return "diffusers" if "unet/diffusion_pytorch_model.safetensors" in files else "diffusers-fp16"
    if "kandinsky3.json" in files:
        return "native"
    if any(re.fullmatch(r"weights/kandinsky3\w*\.pt", name) for name in files):
        has_encoder = any(name.startswith(f"weights/{ENCODER_FOLDER}/") for name in files)
        return "original-3.1" if has_encoder else "original-3.0"
    raise CheckpointError(None, f"files {preview(sorted(files))} match no Kandinsky 3 layout")


def resolve(
    repo_id: str, *, components: tuple[str, ...], variant: str | None = None, revision: str | None = None
) -> Path:
    """Local snapshot folder of ``repo_id`` holding the files ``components`` of ``variant`` need."""
    layout = KNOWN_REPOS.get(repo_id)
    if layout is None and not _offline():
        from huggingface_hub import HfApi

        try:
            layout = _layout_of(HfApi().list_repo_files(repo_id, revision=revision))
        except CheckpointError:
            raise
        except Exception as error:
            raise HubError(repo_id, ["*"], f"cannot list the repository: {first_line(error)}") from None
    if layout is None:  # unknown repo, offline: use whatever the cache holds
        return _download(repo_id, None, [], revision)
    patterns = file_patterns(layout, tuple(components), variant)
    return _download(repo_id, patterns + optional_patterns(layout, tuple(components)), patterns, revision)


def resolve_t5(repo_id: str = FLAN_UL2, revision: str | None = None) -> Path:
    """Local folder with a T5 config, tokenizer and weights (safetensors preferred) from ``repo_id``."""
    weights = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
    if not _offline():
        from huggingface_hub import HfApi

        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception as error:
            raise HubError(repo_id, ["config.json", "spiece.model", "*.safetensors"], first_line(error)) from None
        weights = weights[:2] if any(name.endswith(".safetensors") for name in files) else weights[2:]
    folder = _download(repo_id, ["config.json", *_T5_TOKENIZER, *weights], ["config.json", "spiece.model"], revision)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise HubError(repo_id, weights, "no T5 weight files were obtained")
    return folder
