"""Kandinsky 3 text encoder: tokens → projected context.  Frozen Flan-UL2 T5 encoder, trained projection,
and the null embedding it stores (used by :mod:`kandinsky3.conditioning`).

References (docs/architecture.md): §1.2 data flow, §4.1-4.4 the encoder, §4.7 numerics. The T5 network itself is
`transformers.T5EncoderModel`; it is wrapped, not reimplemented. What the U-Net receives for a prompt, a
negative prompt or no text (both conditioning styles) is decided in :mod:`kandinsky3.conditioning`.

Conventions used throughout this file:
- B batch, N = `max_length` (128) token slots, L context length after the cut, D = T5 d_model
  (4096 for Flan-UL2), C = context_dim (4096 for the released models).
- Masks: 1 / True = real token (EOS included), 0 / False = pad. Tokens are right-padded with pad id 0.
- Context (architecture §4.4): LayerNorm(Linear(T5 states)), then every pad slot set to exactly 0.
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

__all__ = ["MAX_LENGTH", "TextEncoder", "cut_length"]

MAX_LENGTH = 128  # architecture §4.2: hard-coded in both the original code and diffusers
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


def cut_length(attention_mask: torch.Tensor) -> int:
    """Context length L = min(N, max_b n_real_b + 1) for a right-padded (B,N) mask (architecture §4.4 step 4)."""
    n_real = int(attention_mask.to(torch.int64).sum(dim=1).max())
    return min(attention_mask.shape[1], n_real + 1)


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
            with a warning. This is the 3.0 behaviour (architecture §4.4); 3.1 had no guard.

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
        # architecture §4.3: Linear(D -> C, no bias) then affine LayerNorm(C) with the default eps 1e-5.
        self.projection = nn.Sequential(nn.Linear(d_model, context_dim, bias=False), nn.LayerNorm(context_dim))
        self.null_embedding = nn.Parameter(torch.zeros(context_dim))  # architecture §4.5
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

        3.1 `projection*.pt` files use prefix "" (architecture §4.3); the 3.0 `projections` entry of
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
        the pad id and mask 0 (architecture §4.2). A longer prompt keeps its first N-1 ids plus EOS, the
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
        """(B,N) ids and mask -> T5 states (B,L,D) in the projection's dtype/device and bool mask (B,L).

        T5 runs only on the first L = `cut_length` slots: a real token's state does not depend on the pad slots
        after them (they are masked out of attention; relative positions are unchanged), so for a short prompt
        this skips most of T5's work (128 slots in Kandinsky 3). T5 runs on its own device in its own dtype.
        With `nonfinite_guard`, a sample whose states hold inf/NaN is zeroed and fully masked (architecture
        §4.4, 3.0), with a warning, and L is that of the remaining samples.
        """
        # the first parameter that lives somewhere (a streamed T5 keeps its idle weights on the meta device)
        t5_device = next((p.device for p in self.t5.parameters() if not p.is_meta), self.device)
        length = cut_length(attention_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_t5):
            output = self.t5(
                input_ids=input_ids[:, :length].to(t5_device),
                attention_mask=attention_mask[:, :length].to(t5_device, torch.int64),
            )
        states = output[0].to(device=self.device, dtype=self.dtype)  # (B,L,D)
        mask = attention_mask[:, :length].to(device=self.device, dtype=torch.bool)  # (B,L)
        if not self.nonfinite_guard:
            return states, mask
        finite = torch.isfinite(states).flatten(1).all(dim=1)  # (B,)
        if bool(finite.all()):
            return states, mask
        bad = (~finite).nonzero().flatten().tolist()
        warnings.warn(f"T5 output of samples {bad} holds inf/NaN; their context is zeroed and masked out")
        states = torch.where(finite[:, None, None], states, torch.zeros_like(states))
        mask = mask & finite[:, None]
        length = cut_length(mask)
        return states[:, :length], mask[:, :length]

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,N) ids + right-padded (B,N) 0/1 mask -> context (B,L,C), mask (B,L) bool (True = real).

        context = LayerNorm(Linear(T5 states)) with every pad slot then set to 0 (architecture §4.4), in the
        projection's dtype and on its device; L = min(N, longest + 1).
        """
        self._check_tokens(input_ids, attention_mask)
        states, mask = self._t5_states(input_ids, attention_mask)
        context = self.projection(states)  # (B,L,C)
        return torch.where(mask[..., None], context, torch.zeros_like(context)), mask

    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> context (B,L,C), mask (B,L) bool (True = real token); see `encode_tokens`."""
        return self.encode_tokens(*self.tokenize(prompts))

    def null_context_like(self, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept for the trainer until it calls :func:`kandinsky3.conditioning.training_conditions`; see
        :func:`kandinsky3.conditioning.null_context_like`."""
        from ..conditioning import null_context_like

        return null_context_like(self, context, mask)
