"""An LRU cache of encoded prompts: T5 is the slowest stage on a CPU, and UIs send the same prompt again and again.

    cache = cache_prompts(pipe.text_encoder, max_entries=64)   # from now on repeated prompts skip T5
    cache.hits, cache.misses

The hook is the text encoder's public :meth:`~kandinsky3.models.text_encoder.TextEncoder.encode_tokens`, through
which every prompt and negative prompt of every pipeline is encoded: the instance's method is wrapped (the class
and the pipelines are untouched). The key is the exact token ids and mask of the batch, so a hit returns the
very tensors T5 gave for it — results stay bit-identical — and a cached batch is reused whatever the task. LoRA
adapters on the text encoder's projection (:mod:`kandinsky3.lora`, target "text_projection") change what it
returns, so their scales are part of the key; an adapter at scale 0 changes nothing and shares the plain entries.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Callable

import torch

from ..models.text_encoder import TextEncoder

__all__ = ["PromptCache", "adapter_scales", "cache_prompts"]

Encoded = tuple[torch.Tensor, torch.Tensor]  # context (B, L, C), mask (B, L) bool


class PromptCache:
    """Least recently used {token ids and mask → (context, mask)} of at most ``max_entries`` batches.
    ``variant()``, when given, tells what else the encoding depends on now (bytes, part of the key)."""

    def __init__(self, encode_tokens: Callable[[torch.Tensor, torch.Tensor], Encoded], max_entries: int,
                 variant: Callable[[], bytes] | None = None):
        self.encode_tokens = encode_tokens
        self.max_entries = max_entries
        self.variant = variant
        self.hits = self.misses = 0
        self._entries: collections.OrderedDict[bytes, Encoded] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        key = _key(input_ids, attention_mask) + (self.variant() if self.variant is not None else b"")
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if cached is None:
            cached = self.encode_tokens(input_ids, attention_mask)
            with self._lock:
                self.misses += 1
                self._entries[key] = cached
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return cached[0].clone(), cached[1].clone()  # callers may write into what they get

    def __len__(self) -> int:
        return len(self._entries)


def _key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
    ids, mask = input_ids.detach().to("cpu", torch.int64), attention_mask.detach().to("cpu", torch.int64)
    return repr(tuple(ids.shape)).encode() + ids.numpy().tobytes() + mask.numpy().tobytes()


def adapter_scales(text_encoder: TextEncoder) -> bytes:
    """The nonzero scales of the LoRA adapters in ``text_encoder``, as bytes (empty without adapters)."""
    if not getattr(text_encoder, "peft_config", None):  # peft's record of the adapters injected into a module
        return b""
    from ..lora import lora_scales

    scales = lora_scales(text_encoder)  # the text encoder's adapters alone (it takes the U-Net's place)
    return repr(sorted((name, scale) for name, scale in scales.items() if scale != 0)).encode()


def cache_prompts(text_encoder: TextEncoder, max_entries: int = 64) -> PromptCache | None:
    """Wrap ``text_encoder.encode_tokens`` in a :class:`PromptCache` (idempotent); ``max_entries`` 0 caches nothing
    and returns None."""
    current = text_encoder.__dict__.get("encode_tokens")
    if isinstance(current, PromptCache):
        return current
    if max_entries <= 0:
        return None
    cache = PromptCache(text_encoder.encode_tokens, max_entries, functools.partial(adapter_scales, text_encoder))
    text_encoder.encode_tokens = cache  # an instance attribute: shadows the method for this encoder only
    return cache
