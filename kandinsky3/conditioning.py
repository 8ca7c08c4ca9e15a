"""What the U-Net is conditioned on, for sampling and for training: every rule in one place.

Text (docs/architecture.md §4.4-4.6): prompts → (cond, uncond) pairs of (context (B,L,C), mask (B,L)), mask
True = real token, in one of two styles chosen by the weights' layout:

    "original"  — pad slots of a context are 0 (the encoder's own output); the unconditional context is the
                  learned null embedding in slot 0 (mask True only there); a negative prompt is encoded with its
                  own mask (the original truncated it to the prompt's token count: fixed here) and both are
                  zero-padded to a common length.
    "diffusers" — the raw T5 states are zeroed at pad slots *before* the projection, so each pad slot holds
                  LayerNorm(Linear(0)) = the LayerNorm bias, exactly; the unconditional context is that of zero
                  states, all masked (every slot the bias); a negative prompt is cut to the prompt's length.

Pad-slot rule (architecture §2.3): the U-Net's attention pooling queries with the *unmasked* mean over all L slots,
so an image padded to a longer batch would see another query than alone. :func:`pool_as_alone` fills each image's
slots past its own length with the mean of its own slots; sampling (:func:`encode_prompts`, then the pipelines)
and training (:func:`training_conditions`) both go through it, so a training sample and an inference call with
the same prompt give the U-Net identical tensors.

Inpainting (architecture §2.9): :func:`inpainting_channels` builds the 5 channels [keep, masked-image latent]
concatenated to x_t, for the pipeline and the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .diffusion.guidance import Condition
from .errors import UsageError
from .lowmem.storage import compute_dtype
from .models.text_encoder import cut_length

if TYPE_CHECKING:
    from .models.text_encoder import TextEncoder

__all__ = [
    "CONDITIONING_STYLES", "DIFFUSERS", "ORIGINAL", "TextConditions", "check_style", "context_lengths",
    "encode_prompts", "encode_tokens", "gather_conditions", "inpainting_channels", "match_lengths",
    "null_context_like", "pad_context", "pool_as_alone", "training_conditions", "unconditional", "zero_context_like",
]

ORIGINAL = "original"
DIFFUSERS = "diffusers"
CONDITIONING_STYLES = (ORIGINAL, DIFFUSERS)


@dataclass(frozen=True, eq=False)
class TextConditions:
    """The text of one call: ``cond`` = (context (B,L,C), mask (B,L)) and ``uncond`` of the same shapes, or None
    without guidance."""

    cond: Condition
    uncond: Condition | None

    def to(self, device: torch.device) -> TextConditions:
        """The same conditions on ``device`` (dtypes kept)."""
        def move(pair):
            return None if pair is None else (pair[0].to(device), pair[1].to(device))

        return TextConditions(move(self.cond), move(self.uncond))


def check_style(style: str) -> None:
    """Raise a UsageError unless ``style`` is one of :data:`CONDITIONING_STYLES`."""
    if style not in CONDITIONING_STYLES:
        raise UsageError(f"conditioning must be one of {CONDITIONING_STYLES}, got {style!r}")


# ----------------------------------------------------------------------------------------------- contexts


def _check_context(text_encoder: TextEncoder, context: torch.Tensor, mask: torch.Tensor) -> None:
    """Validate a (B,L,C) context of this encoder's width and its (B,L) mask."""
    if context.dim() != 3 or mask.shape != context.shape[:2]:
        raise ValueError(f"need a (B,L,C) context and a (B,L) mask, got {tuple(context.shape)} and {tuple(mask.shape)}")
    if context.shape[2] != text_encoder.context_dim:
        raise ValueError(f"context width {context.shape[2]} != context_dim {text_encoder.context_dim}")


def _pads_hold_bias(text_encoder: TextEncoder, context: torch.Tensor, mask: torch.Tensor) -> Condition:
    """diffusers style from an encoder context: each pad slot becomes the projection of a zero state, which is the
    projection's LayerNorm bias exactly (zero mean and variance); real slots are unchanged."""
    bias = text_encoder.projection[1].bias.to(device=context.device, dtype=context.dtype)  # (C,)
    return torch.where(mask[..., None], context, bias), mask


def encode_tokens(
    text_encoder: TextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, style: str
) -> Condition:
    """(B,N) ids and right-padded 0/1 mask → (context (B,L,C), mask (B,L) bool) in ``style``."""
    context, mask = text_encoder.encode_tokens(input_ids, attention_mask)
    return _pads_hold_bias(text_encoder, context, mask) if style == DIFFUSERS else (context, mask)


def null_context_like(text_encoder: TextEncoder, context: torch.Tensor, mask: torch.Tensor) -> Condition:
    """Original unconditional context (architecture §4.5) shaped like a (B,L,C) context.

    Slot 0 holds the encoder's ``null_embedding``, every other slot is 0; the (B,L) bool mask is True only at
    slot 0. Differentiable w.r.t. the null embedding (it is trained with the U-Net).
    """
    _check_context(text_encoder, context, mask)
    batch, length, channels = context.shape
    null = text_encoder.null_embedding.to(device=context.device, dtype=context.dtype)
    first = null.expand(batch, 1, channels)  # (B,1,C)
    null_context = torch.cat([first, context.new_zeros(batch, length - 1, channels)], dim=1)  # (B,L,C)
    null_mask = torch.zeros(batch, length, dtype=torch.bool, device=mask.device)  # (B,L)
    null_mask[:, 0] = True
    return null_context, null_mask


def zero_context_like(text_encoder: TextEncoder, context: torch.Tensor, mask: torch.Tensor) -> Condition:
    """diffusers unconditional context (architecture §4.5) shaped like a (B,L,C) context: the context of zero
    T5 states with an all-False mask, so every slot is the LayerNorm bias. The null embedding is not used."""
    _check_context(text_encoder, context, mask)
    return _pads_hold_bias(text_encoder, torch.zeros_like(context), torch.zeros_like(mask, dtype=torch.bool))


def unconditional(text_encoder: TextEncoder, context: torch.Tensor, mask: torch.Tensor, style: str) -> Condition:
    """The no-text context of ``style`` shaped like a (B,L,C) context: null embedding or zero states."""
    make = zero_context_like if style == DIFFUSERS else null_context_like
    return make(text_encoder, context, mask)


def pad_context(context: torch.Tensor, mask: torch.Tensor, length: int) -> Condition:
    """Right-pad a (B,L,C) context with zeros and its (B,L) mask with False up to (B,length,·); never cuts.

    Appended slots are masked out of every attention; they change only the pooling query (the unmasked mean,
    architecture §2.3), which :func:`pool_as_alone` restores.
    """
    batch, current, channels = context.shape
    if length < current:
        raise ValueError(f"pad_context cannot shorten a context: length {length} < current length {current}")
    extra = length - current
    context = torch.cat([context, context.new_zeros(batch, extra, channels)], dim=1)  # (B,length,C)
    mask = torch.cat([mask.bool(), mask.new_zeros(batch, extra, dtype=torch.bool)], dim=1)  # (B,length)
    return context, mask


def match_lengths(a: Condition, b: Condition) -> tuple[Condition, Condition]:
    """Zero-pad two (B,L_a,C) / (B,L_b,C) contexts (with masks) to the common length max(L_a, L_b) so they stack."""
    length = max(a[0].shape[1], b[0].shape[1])
    return pad_context(*a, length), pad_context(*b, length)


def _diffusers_negative(text_encoder: TextEncoder, negatives: list[str], length: int) -> Condition:
    """Negatives the diffusers way (architecture §4.6): each encoded with its own mask, then cut (dropping a long
    negative's tail and EOS) or zero-padded to the prompt's ``length``, pads holding the LayerNorm bias."""
    context, mask = text_encoder.encode(negatives)
    if context.shape[1] >= length:
        context, mask = context[:, :length], mask[:, :length]
    else:
        context, mask = pad_context(context, mask, length)
    return _pads_hold_bias(text_encoder, context, mask)


# ----------------------------------------------------------------------------------------------- inference


def encode_prompts(
    text_encoder: TextEncoder,
    prompts: list[str],
    negative_prompts: list[str] | None,
    *,
    style: str,
    guided: bool,
) -> TextConditions:
    """Prompts (and negatives, one per prompt) → :class:`TextConditions` in ``style``, at the batch's length L.

    Without guidance no unconditional branch is built (negatives are then ignored). Gradients follow the
    caller's grad mode; pipelines call this under ``torch.inference_mode``.
    """
    check_style(style)
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise UsageError(f"got {len(negative_prompts)} negative prompts for a batch of {len(prompts)} prompts")
    cond = encode_tokens(text_encoder, *text_encoder.tokenize(prompts), style)
    if not guided:
        return TextConditions(cond, None)
    if negative_prompts is None:
        return TextConditions(cond, unconditional(text_encoder, *cond, style))
    if style == DIFFUSERS:
        return TextConditions(cond, _diffusers_negative(text_encoder, negative_prompts, cond[0].shape[1]))
    return TextConditions(*match_lengths(cond, text_encoder.encode(negative_prompts)))


def context_lengths(conditions: TextConditions) -> torch.Tensor:
    """(B,) int64: per image, the context length it has when encoded alone: 1 + the last real slot of its cond or
    uncond mask, plus the one pad slot (at most the batch's L)."""
    masks = conditions.cond[1] if conditions.uncond is None else conditions.cond[1] | conditions.uncond[1]
    length = masks.shape[1]
    slots = torch.arange(length, device=masks.device)
    last = torch.where(masks, slots, -1).amax(dim=1)  # (B,)
    return (last + 2).clamp(max=length)


def _fill_pad_slots(pair: Condition, lengths: torch.Tensor) -> Condition:
    """Slots ≥ lengths[b] of image b hold the mean of its first lengths[b] slots, and are masked."""
    context, mask = pair
    own = torch.arange(context.shape[1], device=context.device)[None, :] < lengths[:, None]  # (B,L)
    mean = (context * own[..., None]).sum(dim=1, keepdim=True) / lengths[:, None, None]  # (B,1,C)
    return torch.where(own[..., None], context, mean.to(context.dtype)), mask & own


def pool_as_alone(conditions: TextConditions) -> TextConditions:
    """Make each image's pooled text vector the one it has when encoded alone.

    The attention pooling's query is the mean over *all* L context slots, pads included, so an image would
    depend on the longest prompt of its batch. Slots ≥ L_i of image i (:func:`context_lengths`; masked for every
    attention) are filled with the mean of its first L_i slots: the mean over L slots then equals the mean over
    its own L_i, and nothing else sees those slots.
    """
    lengths = context_lengths(conditions).to(conditions.cond[0].device)
    uncond = None if conditions.uncond is None else _fill_pad_slots(conditions.uncond, lengths)
    return TextConditions(_fill_pad_slots(conditions.cond, lengths), uncond)


def gather_conditions(conditions: TextConditions, part: slice) -> TextConditions:
    """The conditions of the images in ``part``, cut to the longest context among them."""
    def pick(pair, length=None):
        return None if pair is None else (pair[0][part, :length], pair[1][part, :length])

    length = int(context_lengths(TextConditions(pick(conditions.cond), pick(conditions.uncond))).max())
    return TextConditions(pick(conditions.cond, length), pick(conditions.uncond, length))


# ----------------------------------------------------------------------------------------------- training


def training_conditions(
    text_encoder: TextEncoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    drop: torch.Tensor,
    *,
    style: str = ORIGINAL,
) -> Condition:
    """(b,N) caption ids / 0-1 mask and (b,) bool ``drop`` → the U-Net's (context (b,L,C), mask (b,L)).

    A kept sample gets its caption's cond context, a dropped one (classifier-free guidance dropout) the
    unconditional context of ``style`` (the null embedding for "original", which is trained so); both exactly as
    :func:`encode_prompts` and :func:`pool_as_alone` give them to the sampler for that caption alone.
    """
    check_style(style)
    length = cut_length(attention_mask)  # T5 never needs the pad columns beyond the cut
    cond = encode_tokens(text_encoder, input_ids[:, :length], attention_mask[:, :length], style)
    conditions = pool_as_alone(TextConditions(cond, unconditional(text_encoder, *cond, style)))
    (context, mask), (null_context, null_mask) = conditions.cond, conditions.uncond
    return torch.where(drop[:, None, None], null_context, context), torch.where(drop[:, None], null_mask, mask)


# ----------------------------------------------------------------------------------------------- inpainting


def inpainting_channels(movq: torch.nn.Module, pixels: torch.Tensor, repaint: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) images in [-1,1] and (B,1,H,W) repaint masks (1 = repaint) → (B,5,h,w) fp32 [keep, masked latent].

    keep = 1 − repaint; every pixel not fully kept is set to 0 (mid-grey) and the image is MoVQ-encoded (on the
    MoVQ's device, in its compute dtype, without gradient: the MoVQ is frozen); keep is resized to the latent size
    by nearest neighbour (architecture §2.9). The result is on the images' device.
    """
    keep = 1.0 - repaint
    masked = pixels * (keep == 1)  # (B,3,H,W)
    device = next(movq.parameters()).device
    with torch.no_grad():
        masked_latent = movq.encode(masked.to(device, compute_dtype(movq))).float().to(pixels.device)  # (B,4,h,w)
    keep_latent = F.interpolate(keep, size=masked_latent.shape[-2:], mode="nearest")  # (B,1,h,w)
    return torch.cat([keep_latent, masked_latent], dim=1)
