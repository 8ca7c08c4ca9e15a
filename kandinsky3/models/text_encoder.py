"""Kandinsky 3 text conditioning: frozen Flan-UL2 T5 encoder, trained projection, null embedding.

References (SPEC.md): §1.2 data flow, §4.1-4.7 text encoder and conditioning, §2.12 and §6.5 the
diffusers call semantics. The T5 network itself is `transformers.T5EncoderModel`; it is wrapped,
not reimplemented.

Conventions used throughout this file:
- B batch, N = `max_length` (128) token slots, L context length after the cut, D = T5 d_model
  (4096 for Flan-UL2), C = context_dim (4096 for the released models).
- Masks: 1 / True = real token (EOS included), 0 / False = pad. Tokens are right-padded with pad id 0.
- "Original" semantics (ai-forever 3.0/3.1, SPEC §4.4): project, then zero the pad slots, so a pad
  slot is exactly 0. "diffusers" semantics (`Kandinsky3Pipeline.encode_prompt` with
  `_cut_context=True`): zero the raw T5 states, then project (diffusers projects inside its U-Net,
  `encoder_hid_proj`), so a pad slot equals the LayerNorm bias. Here the projection always runs
  in this module: the U-Net always receives projected (B,L,C) context.
- Context length: L = min(N, max_b n_real_b + 1), i.e. all real tokens plus one pad slot, unless
  the longest prompt fills all N slots.

Gradients: no method carries a `no_grad` decorator. With `freeze_t5=True` (the default; K3 never
trains T5) the T5 forward always runs without autograd and T5 stays in eval mode, while the
projection and the null embedding follow the caller's grad mode, so a trainer gets gradients for
them. Inference callers should wrap calls in `torch.inference_mode()`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["MAX_LENGTH", "TextEncoder", "cut_length", "match_lengths", "pad_context"]

MAX_LENGTH = 128  # SPEC §4.2: hard-coded in both the original code and diffusers
_PROMPT_PREVIEW = 40  # characters of a truncated prompt quoted in the warning


def _as_prompt_list(prompts: str | Sequence[str], name: str = "prompts") -> list[str]:
    """Normalise one prompt or a sequence of prompts to a non-empty list of str."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a str or a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name} is empty; give at least one prompt (use '' for an empty prompt)")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(prompt).__name__}: {prompt!r}")
    return list(prompts)


def _check_context(context: torch.Tensor, mask: torch.Tensor) -> None:
    """Validate a (B,L,C) context and its (B,L) mask."""
    if context.dim() != 3:
        raise ValueError(f"context must be (B,L,C), got shape {tuple(context.shape)}")
    if mask.shape != context.shape[:2]:
        raise ValueError(f"mask must be (B,L) = {tuple(context.shape[:2])}, got shape {tuple(mask.shape)}")


def cut_length(attention_mask: torch.Tensor) -> int:
    """Context length L = min(N, max_b n_real_b + 1) for a right-padded (B,N) mask (SPEC §4.4 step 4)."""
    n_real = int(attention_mask.to(torch.int64).sum(dim=1).max())
    return min(attention_mask.shape[1], n_real + 1)


def pad_context(context: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a (B,L,C) context with zeros and its (B,L) mask with False up to (B,length,·).

    Padding never changes what the U-Net sees in original semantics: appended slots are masked out
    of attention. (It does change the attention-pooling query, which is the *unmasked* mean over
    the L slots, SPEC §2.3, exactly as any other cut length would.) Cutting is refused: `length`
    must be at least L.
    """
    _check_context(context, mask)
    batch, current, channels = context.shape
    if length < current:
        raise ValueError(f"pad_context cannot shorten a context: length {length} < current length {current}")
    if length == current:
        return context, mask.bool()
    extra = length - current
    zeros = context.new_zeros(batch, extra, channels)  # (B,length-L,C)
    context = torch.cat([context, zeros], dim=1)  # (B,length,C)
    mask = torch.cat([mask.bool(), mask.new_zeros(batch, extra, dtype=torch.bool)], dim=1)  # (B,length)
    return context, mask


def match_lengths(
    context_a: torch.Tensor, mask_a: torch.Tensor, context_b: torch.Tensor, mask_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad two (B,L_a,C) / (B,L_b,C) contexts to the common length max(L_a, L_b) so they stack."""
    length = max(context_a.shape[1], context_b.shape[1])
    context_a, mask_a = pad_context(context_a, mask_a, length)
    context_b, mask_b = pad_context(context_b, mask_b, length)
    return context_a, mask_a, context_b, mask_b


class TextEncoder(nn.Module):
    """Prompts -> (B,L,C) projected T5 context and (B,L) bool mask (True = real token).

    Args:
        t5: a `transformers.T5EncoderModel` (or a bare T5 encoder stack: anything with `.config.d_model`
            whose call `(input_ids=, attention_mask=)` returns the last hidden state first). It keeps
            its own dtype and device.
        tokenizer: the matching T5 tokenizer; it must append EOS and have a pad id (0 for T5).
        context_dim: C, the projection width. Defaults to T5's d_model.
        max_length: N, token slots per prompt including the appended EOS (128 in Kandinsky 3).
        freeze_t5: keep T5 frozen (no grad, always eval mode). Kandinsky 3 never trains T5.
        nonfinite_guard: zero a sample whose T5 output holds inf/NaN (and mask all of it out),
            with a warning. This is the 3.0 behaviour (SPEC §4.4); 3.1 had no guard.

    Parameters (state-dict keys): `projection.0.weight` (C,D), `projection.1.weight` (C,),
    `projection.1.bias` (C,), `null_embedding` (C,), plus the T5 weights under `t5.`.
    """

    def __init__(
        self,
        t5: nn.Module,
        tokenizer,
        context_dim: int | None = None,
        max_length: int = MAX_LENGTH,
        *,
        freeze_t5: bool = True,
        nonfinite_guard: bool = True,
    ):
        super().__init__()
        d_model = int(t5.config.d_model)
        context_dim = d_model if context_dim is None else int(context_dim)
        if context_dim <= 0 or max_length < 1:
            raise ValueError(f"need context_dim > 0 and max_length >= 1, got {context_dim} and {max_length}")
        self.t5 = t5
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.freeze_t5 = freeze_t5
        self.nonfinite_guard = nonfinite_guard
        # SPEC §4.3: Linear(D -> C, no bias) then affine LayerNorm(C) with the default eps 1e-5.
        self.projection = nn.Sequential(nn.Linear(d_model, context_dim, bias=False), nn.LayerNorm(context_dim))
        self.null_embedding = nn.Parameter(torch.zeros(context_dim))  # SPEC §4.5
        self._check_tokenizer()
        if freeze_t5:
            self.t5.requires_grad_(False)
            self.t5.eval()

    def _check_tokenizer(self) -> None:
        """Require T5 conventions: a pad id, and EOS appended to every prompt (so '' -> [EOS])."""
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        if pad_id is None or eos_id is None:
            raise ValueError(f"tokenizer needs pad and EOS tokens, got pad id {pad_id} and EOS id {eos_id}")
        empty = list(self.tokenizer("")["input_ids"])
        if empty != [eos_id]:
            raise ValueError(f"tokenizer must encode '' as [EOS] = [{eos_id}] (T5 convention), got {empty}")

    @property
    def d_model(self) -> int:
        """D, the T5 hidden width."""
        return self.projection[0].in_features

    @property
    def context_dim(self) -> int:
        """C, the projected context width."""
        return self.projection[0].out_features

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the projection, hence of every returned context."""
        return self.projection[0].weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the projection, hence of every returned context and mask."""
        return self.projection[0].weight.device

    def train(self, mode: bool = True) -> TextEncoder:
        """Set train/eval mode; a frozen T5 stays in eval mode (no dropout)."""
        super().train(mode)
        if self.freeze_t5:
            self.t5.eval()
        return self

    # ----------------------------------------------------------------------------- weights

    def load_projection(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Load a flat projection dict with keys `{prefix}0.weight`, `{prefix}1.weight`, `{prefix}1.bias`.

        3.1 `projection*.pt` files use prefix "" (SPEC §4.3); the 3.0 `projections` entry of
        `kandinsky3.pt` uses prefix "t5.". Keys without the prefix are ignored when a prefix is
        given. Keys and shapes are checked before anything is copied, so a bad dict leaves the
        projection untouched: missing or unexpected keys raise KeyError, wrong shapes ValueError.
        """
        selected = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        expected = {key: tuple(value.shape) for key, value in self.projection.state_dict().items()}
        missing, unexpected = sorted(expected.keys() - selected.keys()), sorted(selected.keys() - expected.keys())
        if missing or unexpected:
            raise KeyError(f"projection keys (prefix {prefix!r}): missing {missing}, unexpected {unexpected}")
        for key, shape in expected.items():
            if tuple(selected[key].shape) != shape:
                raise ValueError(f"projection {prefix}{key} has shape {tuple(selected[key].shape)}, expected {shape}")
        self.projection.load_state_dict(selected, strict=True)

    def load_null_embedding(self, null_embedding: torch.Tensor) -> None:
        """Copy a (C,) null embedding (the `null_embedding` entry of an original U-Net file) in place."""
        if tuple(null_embedding.shape) != (self.context_dim,):
            raise ValueError(f"null_embedding must have shape ({self.context_dim},), got {tuple(null_embedding.shape)}")
        with torch.no_grad():
            self.null_embedding.copy_(null_embedding)

    # ----------------------------------------------------------------------------- tokens

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids (B,N) int64, attention_mask (B,N) int64), N = max_length, CPU.

        Each prompt becomes at most N ids including the appended EOS (no BOS), right-padded with
        the pad id and mask 0 (SPEC §4.2). A longer prompt keeps its first N-1 ids plus EOS, the
        same as the tokenizer's own `truncation=True`, and triggers a warning naming the number of
        ids cut. '' gives a single real token, EOS.
        """
        prompts = _as_prompt_list(prompts)
        eos_id, pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), self.max_length), pad_id, dtype=torch.int64)  # (B,N)
        attention_mask = torch.zeros((len(prompts), self.max_length), dtype=torch.int64)  # (B,N)
        for index, (prompt, ids) in enumerate(zip(prompts, self.tokenizer(prompts)["input_ids"])):
            ids = list(ids)
            if len(ids) > self.max_length:
                warnings.warn(
                    f"prompt {index} is {len(ids)} tokens long (EOS included); {len(ids) - self.max_length} "
                    f"tokens were cut to fit max_length={self.max_length}. Prompt starts: "
                    f"{prompt[:_PROMPT_PREVIEW]!r}",
                    stacklevel=2,
                )
                ids = ids[: self.max_length - 1] + [eos_id]
            input_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[index, : len(ids)] = 1
        return input_ids, attention_mask

    def _check_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Require (B,N) integer ids and a right-padded 0/1 mask of the same shape."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (B,N), got shape {tuple(input_ids.shape)} (use .unsqueeze(0) for one prompt)"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        if input_ids.is_floating_point():
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        mask = attention_mask.to(torch.int64)
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1 (1 = real token)")
        if (mask[:, 1:] > mask[:, :-1]).any():
            raise ValueError("attention_mask must be right-padded: a 1 follows a 0 in some row")

    # ----------------------------------------------------------------------------- encoding

    def _t5_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,N) ids and mask -> raw T5 states (B,N,D) in the projection's dtype/device, bool mask (B,N).

        T5 runs only on the first L = `cut_length` slots, and the slots after them are returned as zeros: a real
        token's state does not depend on the pad slots (they are masked out of attention; relative positions are
        unchanged), and every caller zeroes or cuts the pad slots anyway. For a short prompt this skips most of
        T5's work (128 slots in Kandinsky 3). T5 runs on its own device in its own dtype. With
        `nonfinite_guard`, a sample whose computed states hold inf/NaN is zeroed and fully masked (SPEC §4.4,
        3.0), with a warning.
        """
        # the first parameter that lives somewhere (a streamed T5 keeps its idle weights on the meta device)
        t5_device = next((p.device for p in self.t5.parameters() if not p.is_meta), self.device)
        batch, slots = input_ids.shape
        length = cut_length(attention_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_t5):
            output = self.t5(
                input_ids=input_ids[:, :length].to(t5_device),
                attention_mask=attention_mask[:, :length].to(t5_device, torch.int64),
            )
        states = output[0].to(device=self.device, dtype=self.dtype)  # (B,L,D)
        if length < slots:
            states = torch.cat([states, states.new_zeros(batch, slots - length, states.shape[2])], dim=1)  # (B,N,D)
        mask = attention_mask.to(device=self.device, dtype=torch.bool)  # (B,N)
        if self.nonfinite_guard:
            finite = torch.isfinite(states).flatten(1).all(dim=1)  # (B,)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                warnings.warn(f"T5 output of samples {bad} holds inf/NaN; their context is zeroed and masked out")
                states = torch.where(finite[:, None, None], states, torch.zeros_like(states))
                mask = mask & finite[:, None]
        return states, mask

    def _project(self, states: torch.Tensor, mask: torch.Tensor, zero_before_projection: bool) -> torch.Tensor:
        """Raw (B,L,D) states and bool (B,L) mask -> (B,L,C) context with pad slots zeroed.

        The projection acts on each slot separately, so projecting after the cut to L equals the
        reference order (project all N slots, then cut).
        """
        keep = mask[..., None]  # (B,L,1)
        if zero_before_projection:  # diffusers: pad slots become LayerNorm(Linear(0)) = LN bias
            return self.projection(torch.where(keep, states, torch.zeros_like(states)))
        context = self.projection(states)  # original: project, then zero the pad slots
        return torch.where(keep, context, torch.zeros_like(context))

    def encode_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, zero_before_projection: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,N) ids + right-padded (B,N) 0/1 mask -> context (B,L,C), mask (B,L) bool (True = real).

        L = min(N, longest + 1). Default: original semantics (pad slots are 0). With
        `zero_before_projection=True`: diffusers semantics (pad slots are the LayerNorm bias).
        The context has the projection's dtype and device. This is the training entry point.
        """
        self._check_tokens(input_ids, attention_mask)
        states, mask = self._t5_states(input_ids, attention_mask)
        length = cut_length(mask)
        return self._project(states[:, :length], mask[:, :length], zero_before_projection), mask[:, :length]

    def encode(
        self, prompts: str | Sequence[str], *, zero_before_projection: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> context (B,L,C), mask (B,L) bool (True = real token); see `encode_tokens`."""
        input_ids, attention_mask = self.tokenize(prompts)
        return self.encode_tokens(input_ids, attention_mask, zero_before_projection=zero_before_projection)

    # ----------------------------------------------------------------------------- unconditional

    def null_context_like(self, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Original unconditional context (SPEC §4.5) shaped like a (B,L,C) context.

        Slot 0 holds `null_embedding`, every other slot is 0; the (B,L) bool mask is True only at
        slot 0. Differentiable w.r.t. the null embedding (it is trained with the U-Net).
        """
        _check_context(context, mask)
        batch, length, channels = context.shape
        if channels != self.context_dim:
            raise ValueError(f"context width {channels} != context_dim {self.context_dim}")
        null = self.null_embedding.to(device=context.device, dtype=context.dtype)
        first = null.expand(batch, 1, channels)  # (B,1,C)
        null_context = torch.cat([first, context.new_zeros(batch, length - 1, channels)], dim=1)  # (B,L,C)
        null_mask = torch.zeros(batch, length, dtype=torch.bool, device=mask.device)  # (B,L)
        null_mask[:, 0] = True
        return null_context, null_mask

    def zero_context_like(self, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers unconditional context (SPEC §4.5) shaped like a (B,L,C) context.

        diffusers passes zero raw embeddings with an all-zero mask to its U-Net, whose projection
        maps each zero slot to LayerNorm(Linear(0)) = the LayerNorm bias exactly (zero mean, zero
        variance). So every slot is the LN bias and the (B,L) mask is all False. The null embedding
        is not used.
        """
        _check_context(context, mask)
        batch, length, channels = context.shape
        if channels != self.context_dim:
            raise ValueError(f"context width {channels} != context_dim {self.context_dim}")
        bias = self.projection[1].bias.to(device=context.device, dtype=context.dtype)
        zero_context = bias.expand(batch, length, channels).clone()  # (B,L,C)
        return zero_context, torch.zeros(batch, length, dtype=torch.bool, device=mask.device)

    # ----------------------------------------------------------------------------- negative prompts

    def _negatives_for(self, negative_prompts: str | Sequence[str], batch: int) -> list[str]:
        """A str is repeated for every prompt; a list must have one negative per prompt."""
        negatives = _as_prompt_list(negative_prompts, "negative_prompts")
        if isinstance(negative_prompts, str):
            return negatives * batch
        if len(negatives) != batch:
            raise ValueError(f"got {len(negatives)} negative prompts for a batch of {batch} prompts")
        return negatives

    def encode_with_negative(
        self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts and negatives -> (context, mask, negative_context, negative_mask), all (B,L,·).

        Fixed semantics: each negative is tokenised and encoded with its own mask (original
        projection order), independently of the positive, then both are zero-padded to the common
        L = max(L_pos, L_neg) so they can be stacked into one CFG batch. A str negative is used
        for every prompt.
        """
        context, mask = self.encode(prompts)
        negatives = self._negatives_for(negative_prompts, context.shape[0])
        negative_context, negative_mask = self.encode(negatives)
        return match_lengths(context, mask, negative_context, negative_mask)

    def encode_negative_original(
        self, negative_prompts: str | Sequence[str], attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Negatives encoded the ai-forever 3.0/3.1 T2I way (SPEC §4.6) -> (B,L,C), (B,L) bool.

        `attention_mask` is the positive prompts' (B,N) tokenised mask with n_b real tokens. Each
        negative's ids are cut to its first n_b ids, the last kept id is forced to EOS, the rest is
        pad, and T5 and the zeroing use the *positive* mask, so a shorter negative attends to pad
        tokens. The result has the positive's length L. Reproduces the original behaviour only.
        """
        negative_ids, negative_mask = self.tokenize(self._negatives_for(negative_prompts, attention_mask.shape[0]))
        self._check_tokens(negative_ids, attention_mask)
        n_positive = attention_mask.to(torch.int64).sum(dim=1).cpu()  # (B,)
        if bool((n_positive == 0).any()):
            raise ValueError("every positive mask needs at least one real token (its EOS)")
        slots = torch.arange(self.max_length)  # (N,)
        ids = torch.where(slots < n_positive[:, None], negative_ids, self.tokenizer.pad_token_id)  # (B,N)
        last = torch.minimum(n_positive, negative_mask.sum(dim=1)) - 1  # (B,) last kept id
        ids[torch.arange(ids.shape[0]), last] = self.tokenizer.eos_token_id
        return self.encode_tokens(ids, attention_mask.cpu())

    def encode_negative_diffusers(
        self, negative_prompts: str | Sequence[str], length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Negatives encoded the diffusers way (SPEC §4.6) -> (B,length,C), (B,length) bool.

        Each negative is tokenised to N with its own mask and encoded in full; the raw states are
        zeroed at pad slots, sliced to the positive's `length` (which may drop the negative's tail
        and EOS) and projected, so pad slots are the LayerNorm bias. A str gives a batch of one.
        """
        if not 1 <= length <= self.max_length:
            raise ValueError(f"length must be in [1, {self.max_length}], got {length}")
        input_ids, attention_mask = self.tokenize(negative_prompts)
        states, mask = self._t5_states(input_ids, attention_mask)
        return self._project(states[:, :length], mask[:, :length], zero_before_projection=True), mask[:, :length]
