"""The frozen-T5 cache: lookups return each sequence's own states, and conditioning through it equals T5's."""

from __future__ import annotations

import pytest
import torch
from _tiny_text import tiny_text_encoder

from kandinsky3.conditioning import training_conditions
from kandinsky3.training.text_cache import CachedT5, t5_states

PROMPTS = ["a red circle", "a large blue square on the left against a black background", "a green triangle",
           "a red circle"]


def test_cached_t5_returns_the_states_of_each_sequence():
    ids = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0], [5, 6, 7, 1]])
    mask = (ids != 0).long()
    states = torch.randn(3, 4, 2)
    cache = CachedT5(ids, mask, states)
    out = cache(input_ids=torch.tensor([[7, 1, 0], [5, 6, 1]]), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))[0]
    assert torch.equal(out, torch.stack([states[1, :3], states[0, :3]]))
    with pytest.raises(KeyError, match=r"sequences \[0\] of the batch are not in the text cache"):
        cache(input_ids=torch.tensor([[5, 1]]), attention_mask=torch.tensor([[1, 1]]))
    with pytest.raises(KeyError, match="longer than any cached one"):
        cache(input_ids=torch.tensor([[7, 1, 0, 0, 0]]), attention_mask=torch.tensor([[1, 1, 0, 0, 0]]))


def test_conditions_through_the_cache_equal_those_through_t5():
    """A batch padded to its own width and partly dropped gets, through the cache (states computed once, in other
    batches, at the longest prompt's width), the conditions T5 itself gives it, to float rounding."""
    encoder = tiny_text_encoder()
    states = t5_states(encoder, PROMPTS, chunk=2)
    assert states["states"].shape[0] == 3  # distinct prompts only
    ids, mask = encoder.tokenize([PROMPTS[2], PROMPTS[0]])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        direct = training_conditions(encoder, ids, mask, drop)
        encoder.t5 = CachedT5(**states)
        cached = training_conditions(encoder, ids, mask, drop)
    for a, b in zip(cached, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
