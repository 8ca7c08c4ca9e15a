"""Rename tables between the original Kandinsky 3 U-Net keys and diffusers' ``Kandinsky3UNet``.

docs/architecture.md §2.10–2.11.  diffusers folds the text projection into the U-Net
(``encoder_hid_proj.projection_linear`` / ``projection_norm``); the original keeps it apart
(3.0: ``projections`` with ``t5.0.weight``, ``t5.1.{weight,bias}``; 3.1: ``projection.pt`` with
``0.weight``, ``1.{weight,bias}``).  Here the projection is always the flat 3.1 layout
``{"0.weight", "1.weight", "1.bias"}``, the one :class:`kandinsky3.models.TextEncoder`'s
``projection`` module uses.

Both directions are pure functions over state dicts: tensors are passed through, never copied.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "diffusers_to_original_unet",
    "original_to_diffusers_unet",
    "PROJECTION_FROM_DIFFUSERS",
    "PROJECTION_FROM_3_0",
]

# Whole-prefix renames (original <-> diffusers), applied to the start of a key.
_PREFIXES = [
    ("to_time_embed.1.", "time_embedding.linear_1."),
    ("to_time_embed.3.", "time_embedding.linear_2."),
    ("in_layer.", "conv_in."),
    ("out_layer.0.", "conv_norm_out."),
    ("out_layer.2.", "conv_out."),
    ("feature_pooling.", "add_time_condition."),
    ("down_samples.", "down_blocks."),
    ("up_samples.", "up_blocks."),
]
# Attention projection names, as the last module segment before weight.
_ATTENTION = [
    (".to_query.", ".to_q."),
    (".to_key.", ".to_k."),
    (".to_value.", ".to_v."),
    (".output_layer.", ".to_out.0."),
]

PROJECTION_FROM_DIFFUSERS = {
    "encoder_hid_proj.projection_linear.weight": "0.weight",
    "encoder_hid_proj.projection_norm.weight": "1.weight",
    "encoder_hid_proj.projection_norm.bias": "1.bias",
}
PROJECTION_FROM_3_0 = {"t5.0.weight": "0.weight", "t5.1.weight": "1.weight", "t5.1.bias": "1.bias"}

_ORIGINAL_TRIPLE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.resnet_attn_blocks\.(\d+)\.([012])\.")
_ORIGINAL_SELF = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.self_attention_block\.")
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets_in|attentions|resnets_out)\.(\d+)\.")
_SLOT_TO_DIFFUSERS = {"0": "resnets_in", "2": "resnets_out"}


def _swap(key: str, pairs: list[tuple[str, str]], reverse: bool, anywhere: bool) -> str:
    for original, diffusers in pairs:
        old, new = (diffusers, original) if reverse else (original, diffusers)
        if anywhere and old in key:
            return key.replace(old, new)
        if not anywhere and key.startswith(old):
            return new + key[len(old):]
    return key


def _original_key_to_diffusers(key: str) -> str:
    key = _swap(key, _PREFIXES, reverse=False, anywhere=False)
    key = _swap(key, _ATTENTION, reverse=False, anywhere=True)
    match = _ORIGINAL_TRIPLE.match(key)
    if match:
        path, level, triple, slot = match.groups()
        block = f"attentions.{int(triple) + 1}" if slot == "1" else f"{_SLOT_TO_DIFFUSERS[slot]}.{triple}"
        return f"{path}.{level}.{block}." + key[match.end():]
    match = _ORIGINAL_SELF.match(key)
    if match:
        return f"{match.group(1)}.{match.group(2)}.attentions.0." + key[match.end():]
    return key


def _diffusers_key_to_original(key: str) -> str:
    match = _DIFFUSERS_BLOCK.match(key)
    if match:
        path, level, kind, index = match.groups()
        if kind == "attentions":
            block = "self_attention_block" if index == "0" else f"resnet_attn_blocks.{int(index) - 1}.1"
        else:
            block = f"resnet_attn_blocks.{index}.{'0' if kind == 'resnets_in' else '2'}"
        key = f"{path}.{level}.{block}." + key[match.end():]
    key = _swap(key, _ATTENTION, reverse=True, anywhere=True)
    return _swap(key, _PREFIXES, reverse=True, anywhere=False)


def diffusers_to_original_unet(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a diffusers ``Kandinsky3UNet`` state dict into (original U-Net keys, projection).

    The projection comes back in the flat 3.1 layout ``0.weight``, ``1.weight``, ``1.bias``.
    Raises ValueError if the projection is missing.
    """
    unet: dict[str, torch.Tensor] = {}
    projection: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in PROJECTION_FROM_DIFFUSERS:
            projection[PROJECTION_FROM_DIFFUSERS[key]] = tensor
        else:
            unet[_diffusers_key_to_original(key)] = tensor
    if len(projection) != len(PROJECTION_FROM_DIFFUSERS):
        missing = sorted(set(PROJECTION_FROM_DIFFUSERS) - set(state_dict))
        raise ValueError(f"diffusers U-Net state dict lacks the text projection keys {missing}")
    return unet, projection


def original_to_diffusers_unet(
    unet_state_dict: dict[str, torch.Tensor], projection: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Merge an original U-Net state dict and a flat projection into diffusers' key layout."""
    out = {_original_key_to_diffusers(key): tensor for key, tensor in unet_state_dict.items()}
    inverse = {v: k for k, v in PROJECTION_FROM_DIFFUSERS.items()}
    if set(projection) != set(inverse):
        raise ValueError(
            f"projection must have exactly the keys {sorted(inverse)}, got {sorted(projection)}"
        )
    out.update({inverse[key]: tensor for key, tensor in projection.items()})
    return out
