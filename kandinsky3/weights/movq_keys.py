"""MoVQ state-dict conversion: original ``movq.pt`` layout <-> diffusers ``VQModel(norm_type="spatial")`` layout.

References: docs/architecture.md §3.4 (original key names) and §3.5 (rename rules). The original layout is exactly the
``state_dict()`` of ``kandinsky3.models.movq.MoVQ``. Rules, generic in the number of levels and blocks:

- ``encoder.down.{i}.block.{j}`` -> ``encoder.down_blocks.{i}.resnets.{j}``; ``.attn.{j}`` -> ``.attentions.{j}``;
  ``.downsample`` -> ``.downsamplers.0``.
- ``decoder.up.{i}`` -> ``decoder.up_blocks.{L-1-i}`` (level order reversed, L = number of levels);
  ``.upsample`` -> ``.upsamplers.0``.
- ``{enc,dec}.mid.block_1/block_2/attn_1`` -> ``mid_block.resnets.0/resnets.1/attentions.0``;
  ``norm_out`` -> ``conv_norm_out``; ``nin_shortcut`` -> ``conv_shortcut``.
- Encoder norms drop ``.norm_layer``; an encoder attention's ``norm.norm_layer`` is ``group_norm``. Decoder
  (spatial) norms keep ``norm_layer/conv_y/conv_b``; a decoder attention's ``norm`` is ``spatial_norm``.
- Attention ``q/k/v/proj_out`` -> ``to_q/to_k/to_v/to_out.0``; weights (C,C,1,1) <-> (C,C).
- diffusers always has ``quantize.embedding.weight``: dropped when the target config has no codebook, mapped
  unchanged when it has one (the quantiser's training statistics are then started fresh from it).

Pure functions: tensors in, tensors out (views/reshapes only); nothing is loaded from disk here.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Mapping

import torch

from kandinsky3.models.movq import MoVQ, MoVQConfig, VectorQuantizer

CODEBOOK_KEY = "quantize.embedding.weight"

_Prefix = Callable[[re.Match, int], str]

# (original-key prefix, diffusers prefix builder (match, num_levels), kind of module under the prefix).
# Decoder levels are reversed: original up.{i} is diffusers up_blocks.{num_levels - 1 - i}.
_PREFIX_RULES: tuple[tuple[re.Pattern, _Prefix, str], ...] = tuple(
    (re.compile(pattern), build, kind)
    for pattern, build, kind in (
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.", "block"),
        (r"encoder\.down\.(\d+)\.attn\.(\d+)\.", lambda m, n: f"encoder.down_blocks.{m[1]}.attentions.{m[2]}.", "attn"),
        (r"encoder\.down\.(\d+)\.downsample\.", lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.", "other"),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m, n: f"{_up(m, n)}.resnets.{m[2]}.", "block"),
        (r"decoder\.up\.(\d+)\.attn\.(\d+)\.", lambda m, n: f"{_up(m, n)}.attentions.{m[2]}.", "attn"),
        (r"decoder\.up\.(\d+)\.upsample\.", lambda m, n: f"{_up(m, n)}.upsamplers.0.", "other"),
        (r"(encoder|decoder)\.mid\.block_1\.", lambda m, n: f"{m[1]}.mid_block.resnets.0.", "block"),
        (r"(encoder|decoder)\.mid\.block_2\.", lambda m, n: f"{m[1]}.mid_block.resnets.1.", "block"),
        (r"(encoder|decoder)\.mid\.attn_1\.", lambda m, n: f"{m[1]}.mid_block.attentions.0.", "attn"),
        (r"(encoder|decoder)\.norm_out\.", lambda m, n: f"{m[1]}.conv_norm_out.", "norm"),
    )
)

# Leaf renames inside a module, by (kind, side). Leaves not listed keep their name.
_LEAF_RULES: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("block", "encoder"): (
        ("norm1.norm_layer.", "norm1."),
        ("norm2.norm_layer.", "norm2."),
        ("nin_shortcut.", "conv_shortcut."),
    ),
    ("block", "decoder"): (("nin_shortcut.", "conv_shortcut."),),
    ("attn", "encoder"): (("norm.norm_layer.", "group_norm."),),
    ("attn", "decoder"): (("norm.", "spatial_norm."),),
    ("norm", "encoder"): (("norm_layer.", ""),),
    ("norm", "decoder"): (),
}
_ATTN_PROJECTIONS = (("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."))


def _up(match: re.Match, num_levels: int) -> str:
    return f"decoder.up_blocks.{num_levels - 1 - int(match[1])}"


def _rename(key: str, num_levels: int) -> tuple[str, bool]:
    """Original key -> (diffusers key, whether the tensor is a 1×1-conv attention weight to squeeze)."""
    for pattern, build, kind in _PREFIX_RULES:
        match = pattern.match(key)
        if match is None:
            continue
        leaf = key[match.end():]
        rules = _LEAF_RULES.get((kind, key.split(".", 1)[0]), ())
        if kind == "attn":
            rules = rules + _ATTN_PROJECTIONS
        for old, new in rules:
            if leaf.startswith(old):
                is_proj = (old, new) in _ATTN_PROJECTIONS and leaf.endswith("weight")
                return build(match, num_levels) + new + leaf[len(old):], is_proj
        return build(match, num_levels) + leaf, False
    return key, False  # conv_in, conv_out, quant_conv, post_quant_conv, quantize.embedding


@functools.lru_cache(maxsize=16)
def _layout(config: MoVQConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, str], frozenset[str], frozenset[str]]:
    """(original key -> shape, original -> diffusers key, keys to squeeze, quantiser training-state keys).

    Shapes come from ``MoVQ(config)`` built on the meta device (no memory, no init cost). Cached per config.
    """
    with torch.device("meta"):
        model = MoVQ(config)
    training = frozenset(f"quantize.{n}" for n, _ in model.quantize.named_buffers()) if model.quantize else frozenset()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in training}
    table, squeeze = {}, set()
    for key in shapes:
        table[key], is_proj = _rename(key, config.num_levels)
        if is_proj:
            squeeze.add(key)
    if len(set(table.values())) != len(table):
        raise AssertionError("MoVQ rename table is not one-to-one")
    return shapes, table, frozenset(squeeze), training


def original_to_diffusers_keys(config: MoVQConfig) -> dict[str, str]:
    """The explicit rename table (original key -> diffusers key) for every weight of ``MoVQ(config)``."""
    return dict(_layout(config)[1])


def _check(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    bad = [f"{k}: {tuple(state_dict[k].shape)} != {expected[k]}" for k in sorted(set(expected) & set(state_dict))
           if tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or bad:
        raise ValueError(
            f"{what} state dict does not match the config ({len(state_dict)} tensors, {len(expected)} expected): "
            f"missing keys {_head(missing)}, unexpected keys {_head(unexpected)}, wrong shapes {_head(bad)}"
        )


def _head(items: list[str], n: int = 8) -> str:
    return str(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def original_to_diffusers_movq(
    state_dict: Mapping[str, torch.Tensor], config: MoVQConfig, *, codebook: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Original/``MoVQ`` state dict -> diffusers ``VQModel`` state dict (same tensors, attention weights squeezed).

    Quantiser training statistics (``quantize.cluster_size`` …), if present, are dropped. diffusers' VQModel
    always has ``quantize.embedding.weight``: when ``config`` has no codebook, pass ``codebook`` ((K, z_channels),
    e.g. zeros; unused by ``decode(..., force_not_quantize=True)``) to get a dict that loads with ``strict=True``.
    """
    shapes, table, squeeze, training = _layout(config)
    weights = {k: v for k, v in state_dict.items() if k not in training}
    _check(weights, shapes, "original MoVQ")
    out = {}
    for key, tensor in weights.items():
        out[table[key]] = tensor.reshape(tensor.shape[:2]) if key in squeeze else tensor  # (C,C,1,1) -> (C,C)
    if codebook is not None:
        if config.codebook_size > 0:
            raise ValueError("codebook= is only for configs without one; this config already has quantize.embedding")
        if codebook.ndim != 2 or codebook.shape[1] != config.z_channels:
            raise ValueError(f"codebook must be (K, {config.z_channels}), got {tuple(codebook.shape)}")
        out[CODEBOOK_KEY] = codebook
    return out


def diffusers_to_original_movq(state_dict: Mapping[str, torch.Tensor], config: MoVQConfig) -> dict[str, torch.Tensor]:
    """diffusers ``VQModel(norm_type="spatial")`` state dict -> original layout, loadable by ``MoVQ(config)`` strictly.

    ``quantize.embedding.weight`` is dropped when ``config.codebook_size == 0`` and mapped otherwise (shape
    (codebook_size, z_channels)); in that case fresh quantiser statistics are added from the codebook.
    """
    shapes, table, squeeze, training = _layout(config)
    inverse = {new: old for old, new in table.items()}
    expected = {new: shapes[old][:2] if old in squeeze else shapes[old] for old, new in table.items()}
    weights = dict(state_dict)
    if config.codebook_size == 0:
        weights.pop(CODEBOOK_KEY, None)
    _check(weights, expected, "diffusers VQModel")
    out = {}
    for key, tensor in weights.items():
        old = inverse[key]
        out[old] = tensor.reshape(shapes[old]) if old in squeeze else tensor  # (C,C) -> (C,C,1,1)
    if training:
        fresh = VectorQuantizer.initial_state(out[CODEBOOK_KEY])
        out.update({f"quantize.{name}": value for name, value in fresh.items()})
        if set(out) != set(shapes) | training:
            raise AssertionError("quantiser training-state keys out of sync with VectorQuantizer.initial_state")
    return out
