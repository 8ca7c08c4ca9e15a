"""LoRA adapters for Kandinsky 3 through peft: inject, save, load, scale, fuse and unfuse.

A LoRA adds ΔW = (alpha / rank) · scale · B·A beside a frozen weight W (Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv 2106.09685). The adapter layers are peft's (``peft.inject_adapter_in_model``); this
module says which layers of *our* networks are targeted, how an adapter is stored, and how several adapters live
in one pipeline. It works on the modules themselves, so a pipeline's methods and the trainer share it.

Targets (:data:`TARGET_GROUPS`): "attention" (default) = every U-Net attention projection (to_query, to_key,
to_value, output_layer, in self-, cross- and pooling attention, docs/architecture.md §2.3, §2.6); "resnet" = the
convolutions of the residual blocks (§2.5); "text_projection" = the text encoder's Linear projection (§4.3).

The file is one safetensors file::

    unet.<module path>.lora_A.weight            (rank, in) or (rank, in, k, k)
    unet.<module path>.lora_B.weight            (out, rank) or (out, rank, 1, 1)
    text_encoder.projection.0.lora_A.weight     (with the "text_projection" target)
    ...

Module paths are the plain network's (``down_samples.1.self_attention_block.attention.to_query``), so the keys do
not depend on peft's internals or on the adapter's name. Metadata (strings): ``format`` "kandinsky3-lora",
``format_version``, ``rank``, ``alpha``, ``dropout``, ``targets`` (JSON list), ``trigger_words`` (JSON list),
``base_model`` (where the base came from), ``base_unet_config`` (sha256 of the U-Net config) and
``base_unet_probes`` (JSON list of a few base weights, so another model with the same architecture is refused).

Several adapters may be loaded at once, each with its own name and scale; all loaded adapters are active.
:func:`fuse_lora` adds the active deltas into the base weights (a plain forward afterwards) and keeps a copy of
the weights it changed, so :func:`unfuse_lora` restores them bit for bit. While fused, only unfusing is allowed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT", "TARGET_GROUPS", "BaseIdentity", "LoraFile", "LoraSpec", "base_identity", "fuse_lora", "inject_lora",
    "load_lora", "lora_scales", "lora_state_dict", "parse_lora_option", "parse_prompt_loras", "read_lora",
    "save_lora", "set_lora_scale", "unfuse_lora", "unload_lora", "with_prompt_lora",
]

FORMAT, FORMAT_VERSION = "kandinsky3-lora", 1

#: target group → (component, regular expression over that component's module paths, matched whole)
TARGET_GROUPS: dict[str, tuple[str, str]] = {
    "attention": ("unet", r"(.*\.)?attention\.(to_query|to_key|to_value|output_layer)"),
    "resnet": ("unet", r"(.*\.)?resnet_blocks\.\d+\.projection"),
    "text_projection": ("text_encoder", r"projection\.0"),
}
#: U-Net tensors no target touches, sampled to tell one base model from another with the same architecture
PROBE_TENSORS = ("in_layer.weight", "to_time_embed.1.weight", "to_time_embed.3.weight", "out_layer.2.weight")
PROBES_PER_TENSOR = 8
_UNFUSED = "_kandinsky3_unfused"  # the attribute holding a fused layer's original weight
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _peft():
    """peft's functional API, imported when first needed (the ``lora`` extra: ``pip install kandinsky3[lora]``)."""
    try:
        import peft.functional
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer
    except ImportError as error:
        raise UsageError("LoRA needs the peft package: pip install 'kandinsky3[lora]' (or pip install peft)") from error
    return peft.functional, LoraConfig, LoraLayer


# ----------------------------------------------------------------------------------------------- what is adapted


@dataclass(frozen=True)
class LoraSpec:
    """An adapter's shape: rank r, alpha (ΔW is scaled by alpha / r), dropout on the adapter's input, targets."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention",)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"LoRA needs rank >= 1, alpha > 0, 0 <= dropout < 1; got rank {self.rank}, "
                             f"alpha {self.alpha}, dropout {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGET_GROUPS))
        if unknown or not self.targets:
            raise UsageError(f"unknown LoRA targets {unknown}; choose one or more of {list(TARGET_GROUPS)}")

    def patterns(self) -> dict[str, str]:
        """{component: one regular expression over its module paths} for the targets."""
        out: dict[str, list[str]] = {}
        for target in self.targets:
            component, pattern = TARGET_GROUPS[target]
            out.setdefault(component, []).append(f"(?:{pattern})")
        return {component: "|".join(parts) for component, parts in out.items()}

    def to_metadata(self) -> dict[str, str]:
        return {"rank": str(self.rank), "alpha": repr(float(self.alpha)), "dropout": repr(float(self.dropout)),
                "targets": json.dumps(list(self.targets))}


def _components(unet: nn.Module, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    return {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}


def _lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module path, peft LoRA layer) pairs of ``module``, in module order."""
    layer_type = _peft()[2]
    for path, child in module.named_modules():
        if isinstance(child, layer_type):
            yield path, child


def _all_layers(unet: nn.Module, text_encoder: nn.Module | None) -> Iterator[tuple[str, nn.Module]]:
    """("component.path", layer) over both components."""
    for component, module in _components(unet, text_encoder).items():
        for path, layer in _lora_layers(module):
            yield f"{component}.{path}", layer


def lora_scales(unet: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, float]:
    """{name: scale} of the adapters loaded into these modules, in the order they were loaded."""
    scales: dict[str, float] = {}
    for _, layer in _all_layers(unet, text_encoder):
        for name in layer.lora_A:
            scales.setdefault(name, layer.scaling[name] * layer.r[name] / layer.lora_alpha[name])
    return scales


def _is_fused(unet: nn.Module, text_encoder: nn.Module | None) -> bool:
    return any(hasattr(layer, _UNFUSED) for _, layer in _all_layers(unet, text_encoder))


def _refuse_when_fused(unet: nn.Module, text_encoder: nn.Module | None, action: str) -> None:
    if _is_fused(unet, text_encoder):
        raise UsageError(f"cannot {action} while the LoRA weights are fused; call unfuse_lora() first")


def inject_lora(unet: nn.Module, text_encoder: nn.Module | None, spec: LoraSpec, name: str = "default", *,
                trainable: bool = False, dtype: torch.dtype | None = None) -> list[nn.Parameter]:
    """Add adapter ``name`` (freshly initialised by peft: B = 0, so ΔW = 0) to the targeted layers; returns its
    parameters. ``trainable`` leaves them requiring grad (the trainer), else every adapter is frozen. ``dtype``
    casts the new adapter (fp32 master weights for training; the compute dtype for inference). Every loaded adapter
    stays active. The base weights are frozen by peft."""
    functional, LoraConfig, _ = _peft()
    if not _NAME.match(name):
        raise UsageError(f"a LoRA name holds letters, digits, '_' and '-' only, got {name!r}")
    if name in lora_scales(unet, text_encoder):
        raise UsageError(f"a LoRA named {name!r} is already loaded; unload it first or choose another name")
    _refuse_when_fused(unet, text_encoder, "add a LoRA")
    patterns = spec.patterns()
    if "text_encoder" in patterns and text_encoder is None:
        raise UsageError("the 'text_projection' target needs the text encoder")
    for component, pattern in patterns.items():
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=pattern)
        module = _components(unet, text_encoder)[component]
        with warnings.catch_warnings():  # peft warns that a second adapter goes into a model that has one
            warnings.simplefilter("ignore", UserWarning)
            functional.inject_adapter_in_model(config, module, adapter_name=name)
    names = list(lora_scales(unet, text_encoder))
    params = []
    for _, layer in _all_layers(unet, text_encoder):
        layer.set_adapter(names, inference_mode=not trainable)
        for part in (layer.lora_A, layer.lora_B):
            if name in part:
                if dtype is not None:
                    part[name].to(dtype)
                params.extend(part[name].parameters())
    return params


# ----------------------------------------------------------------------------------------------- base identity


@dataclass(frozen=True)
class BaseIdentity:
    """Which U-Net an adapter belongs to: ``name`` (where it came from, for messages), the sha256 of its config and
    a few of its weights (``probes``, empty for a model on the meta device)."""

    name: str
    config_sha: str
    probes: tuple[float, ...]

    def describe(self) -> str:
        weights = hashlib.sha256(json.dumps([f"{p:.2g}" for p in self.probes]).encode()).hexdigest()[:8]
        return f"{self.name or 'a U-Net'} (config {self.config_sha[:12]}, weights {weights})"

    def matches(self, other: BaseIdentity) -> bool:
        """Same config and the same probed weights to 1 % (a base stored in fp16 or bf16 is the same base)."""
        if self.config_sha != other.config_sha or len(self.probes) != len(other.probes):
            return False
        return torch.allclose(torch.tensor(self.probes), torch.tensor(other.probes), rtol=1e-2, atol=1e-5)


def base_identity(unet: nn.Module, name: str = "") -> BaseIdentity:
    """The :class:`BaseIdentity` of a U-Net (plain, with adapters, or computing in another dtype)."""
    config = json.dumps(unet.config.to_dict(), sort_keys=True)
    probes: list[float] = []
    for key in PROBE_TENSORS:
        tensor = functools.reduce(getattr, key.split("."), unet)
        if tensor.is_meta:
            return BaseIdentity(name, hashlib.sha256(config.encode()).hexdigest(), ())
        flat = tensor.detach().flatten()
        picks = torch.linspace(0, flat.numel() - 1, PROBES_PER_TENSOR).round().long().to(flat.device)
        probes.extend(float(v) for v in flat[picks].float().cpu())
    return BaseIdentity(name, hashlib.sha256(config.encode()).hexdigest(), tuple(probes))


# ----------------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read by :func:`read_lora`: tensors under their stable keys and what the metadata says."""

    path: Path
    tensors: dict[str, torch.Tensor]
    spec: LoraSpec
    base: BaseIdentity
    trigger_words: tuple[str, ...]
    metadata: dict[str, str]


def lora_state_dict(unet: nn.Module, text_encoder: nn.Module | None, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under the file's stable keys, as contiguous CPU copies."""
    out = {}
    for path, layer in _all_layers(unet, text_encoder):
        if name in layer.lora_A:
            out[f"{path}.lora_A.weight"] = layer.lora_A[name].weight.detach().cpu().contiguous().clone()
            out[f"{path}.lora_B.weight"] = layer.lora_B[name].weight.detach().cpu().contiguous().clone()
    if not out:
        raise UsageError(f"no LoRA named {name!r} is loaded; loaded: {list(lora_scales(unet, text_encoder))}")
    return out


def save_lora(path: str | Path, unet: nn.Module, text_encoder: nn.Module | None, name: str, *, spec: LoraSpec,
              base: BaseIdentity, trigger_words: tuple[str, ...] = (), extra: dict[str, str] | None = None) -> Path:
    """Write adapter ``name`` to ``path`` (one safetensors file, see the module docstring); returns the path."""
    from safetensors.torch import save_file

    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), **spec.to_metadata(),
                "trigger_words": json.dumps(list(trigger_words)), "base_model": base.name,
                "base_unet_config": base.config_sha, "base_unet_probes": json.dumps(list(base.probes)),
                **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(unet, text_encoder, name), str(path), metadata=metadata)
    logger.info("wrote LoRA %s (rank %d, targets %s)", path, spec.rank, ", ".join(spec.targets))
    return path


def read_lora(path: str | Path, *, tensors: bool = True) -> LoraFile:
    """Read and check a LoRA file: a safetensors file with this module's metadata (see the module docstring).
    ``tensors=False`` reads the header only (the returned ``tensors`` is empty): what listing a folder needs."""
    from safetensors import safe_open

    from .weights.safe_io import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            weights = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(path, f"is not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(path, f"is not a Kandinsky 3 LoRA file (metadata format {metadata.get('format')!r}, "
                                    f"expected {FORMAT!r})")
    try:
        spec = LoraSpec(int(metadata["rank"]), float(metadata["alpha"]), float(metadata["dropout"]),
                        tuple(json.loads(metadata["targets"])))
        base = BaseIdentity(metadata["base_model"], metadata["base_unet_config"],
                            tuple(json.loads(metadata["base_unet_probes"])))
        trigger_words = tuple(json.loads(metadata.get("trigger_words", "[]")))
    except (KeyError, ValueError) as error:
        raise CheckpointError(path, f"has incomplete LoRA metadata ({error})") from None
    return LoraFile(path, weights, spec, base, trigger_words, metadata)


def _check_keys(lora: LoraFile, expected: dict[str, torch.Size]) -> None:
    """The file's keys must be exactly the adapter's; shapes must agree."""
    from .weights.safe_io import CheckpointError, preview

    unknown, missing = sorted(set(lora.tensors) - set(expected)), sorted(set(expected) - set(lora.tensors))
    if unknown or missing:
        raise CheckpointError(lora.path, f"does not fit this model: unknown keys {preview(unknown)}, missing keys "
                                         f"{preview(missing)}")
    wrong = [f"{k} {tuple(lora.tensors[k].shape)} != {tuple(s)}" for k, s in expected.items()
             if lora.tensors[k].shape != s]
    if wrong:
        raise CheckpointError(lora.path, f"has tensors of the wrong shape: {preview(wrong)}")


def _default_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "lora"


def load_lora(unet: nn.Module, text_encoder: nn.Module | None, path: str | Path, *, scale: float = 1.0,
              name: str | None = None) -> str:
    """Load a LoRA file as adapter ``name`` (default: the file name) at ``scale``; returns the name.

    Refuses (CheckpointError) a file made for another base model, naming both, and a file whose keys are not
    exactly the adapter's. The adapter's tensors take the dtype the U-Net computes in."""
    from .lowmem.storage import compute_dtype
    from .weights.safe_io import CheckpointError

    lora = read_lora(path)
    name = name or _default_name(lora.path)
    mine = base_identity(unet)
    if not lora.base.matches(mine):
        raise CheckpointError(lora.path, f"was trained for the base model {lora.base.describe()}, but this "
                                         f"pipeline's U-Net is another model: {mine.describe()}")
    inject_lora(unet, text_encoder, lora.spec, name, dtype=compute_dtype(unet))
    try:
        targets = {f"{path}.lora_{part}.weight": getattr(layer, f"lora_{part}")[name].weight
                   for path, layer in _all_layers(unet, text_encoder) if name in layer.lora_A for part in "AB"}
        _check_keys(lora, {key: weight.shape for key, weight in targets.items()})
        with torch.no_grad():
            for key, weight in targets.items():
                weight.copy_(lora.tensors[key])
    except Exception:
        unload_lora(unet, text_encoder, name)
        raise
    set_lora_scale(unet, text_encoder, name, scale)
    logger.info("loaded LoRA %r from %s (rank %d, %s) at scale %g", name, lora.path, lora.spec.rank,
                ", ".join(lora.spec.targets), scale)
    return name


# ----------------------------------------------------------------------------------------------- using adapters


def set_lora_scale(unet: nn.Module, text_encoder: nn.Module | None, name: str, scale: float) -> None:
    """Set adapter ``name``'s scale (0 = no effect, 1 = as trained)."""
    if name not in lora_scales(unet, text_encoder):
        raise UsageError(f"no LoRA named {name!r} is loaded; loaded: {list(lora_scales(unet, text_encoder))}")
    if not math.isfinite(scale):
        raise UsageError(f"a LoRA scale must be a finite number, got {scale}")
    _refuse_when_fused(unet, text_encoder, "change a LoRA scale")
    for _, layer in _all_layers(unet, text_encoder):
        layer.set_scale(name, float(scale))


def unload_lora(unet: nn.Module, text_encoder: nn.Module | None = None, name: str | None = None) -> None:
    """Remove adapter ``name`` (None: all); a layer left without adapters becomes its plain base layer again."""
    functional = _peft()[0]
    loaded = list(lora_scales(unet, text_encoder))
    if name is not None and name not in loaded:
        raise UsageError(f"no LoRA named {name!r} is loaded; loaded: {loaded}")
    _refuse_when_fused(unet, text_encoder, "unload a LoRA")
    for gone in loaded if name is None else [name]:
        for module in _components(unet, text_encoder).values():
            functional.delete_adapter(module, gone, prefix="lora_")
            getattr(module, "peft_config", {}).pop(gone, None)
    remaining = [n for n in loaded if n != name] if name is not None else []
    for module in _components(unet, text_encoder).values():
        for path, layer in list(_lora_layers(module)):
            if layer.lora_A:
                layer.set_adapter(remaining, inference_mode=True)
            else:
                parent, _, child = path.rpartition(".")
                setattr(module.get_submodule(parent), child, layer.get_base_layer())
        if not getattr(module, "peft_config", True):
            del module.peft_config


def _stored_weight(layer: nn.Module) -> torch.Tensor:
    """The tensor a base layer's weight is stored in (under :func:`~kandinsky3.lowmem.compute_in`, the original)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


@torch.no_grad()
def fuse_lora(unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
    """Add every active adapter's scaled ΔW into its base weight (forward calls then skip the adapters).

    The original weights of the changed layers are kept beside them (the targeted layers' size again), so
    :func:`unfuse_lora` restores them exactly."""
    _refuse_when_fused(unet, text_encoder, "fuse again")
    layers = list(_all_layers(unet, text_encoder))
    if not layers:
        raise UsageError("no LoRA is loaded: nothing to fuse")
    for _, layer in layers:
        names = [n for n in layer.active_adapters if n in layer.lora_A]
        stored = _stored_weight(layer.get_base_layer())
        setattr(layer, _UNFUSED, stored.detach().clone())
        delta = sum(layer.get_delta_weight(n).float() for n in names)
        stored.copy_((stored.float() + delta).to(stored.dtype))
        layer.merged_adapters.extend(names)  # peft's forward then runs the base layer alone


@torch.no_grad()
def unfuse_lora(unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
    """Undo :func:`fuse_lora`: the kept original weights go back, bit for bit, and the adapters run again."""
    if not _is_fused(unet, text_encoder):
        raise UsageError("the LoRA weights are not fused")
    for _, layer in _all_layers(unet, text_encoder):
        _stored_weight(layer.get_base_layer()).copy_(getattr(layer, _UNFUSED))
        delattr(layer, _UNFUSED)
        layer.merged_adapters.clear()


# ----------------------------------------------------------------------------------------------- text forms


_PROMPT_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:name:scale>`` tags → (prompt without them, [(name, scale)]); the scale defaults to 1.

    ``"a cyan circle <lora:cyan:0.8>"`` → ``("a cyan circle", [("cyan", 0.8)])``."""
    loras = []
    for match in _PROMPT_TAG.finditer(prompt):
        name, scale = match.group(1).strip(), match.group(2)
        try:
            value = 1.0 if scale is None or not scale.strip() else float(scale)
        except ValueError:
            raise UsageError(f"LoRA tag {match.group(0)!r}: the scale must be a number") from None
        loras.append((name, value))
    return " ".join(_PROMPT_TAG.sub(" ", prompt).split()), loras


def with_prompt_lora(prompt: str, name: str, scale: float = 1.0) -> str:
    """``prompt`` naming LoRA ``name`` at ``scale``: the scale of its tag replaced where the prompt has one, else the
    tag appended (what a click on a LoRA does in AUTOMATIC1111's web UI).

    ``with_prompt_lora("a circle <lora:cyan:0.5>", "cyan", 1)`` → ``"a circle <lora:cyan:1>"``."""
    if not name or set(name) & set("<>:"):
        raise UsageError(f"a LoRA name for a prompt tag must be non-empty, without '<', '>' or ':', got {name!r}")
    if not math.isfinite(scale):
        raise UsageError(f"a LoRA scale must be a finite number, got {scale}")
    tag = f"<lora:{name}:{scale:g}>"
    named = [match for match in _PROMPT_TAG.finditer(prompt) if match.group(1).strip() == name]
    if named:
        first = named[0]
        return prompt[:first.start()] + tag + prompt[first.end():]
    return f"{prompt.rstrip()} {tag}".lstrip()


def parse_lora_option(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (the CLI's ``--lora``) → (file, scale); a colon followed by no number is part of the file."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        with contextlib.suppress(ValueError):
            return path, float(scale)
    return text, 1.0
