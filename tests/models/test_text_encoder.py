"""Tests for kandinsky3.models.text_encoder (architecture §4): tokenisation, the encoder's context (original
order: pad slots 0), the inf/NaN guard, weight loading and input errors. What the styles make of it (diffusers'
pad slots, unconditional contexts, negative prompts) is tested in test_conditioning.py.

Tolerances: every comparison is fp32 on CPU between computations that do the same arithmetic,
except that this module projects after the cut to L (the references project all 128 slots and
then cut). Linear/LayerNorm act per slot, so the only possible difference is matmul blocking over
a different number of rows: a few ulp, far below the 1e-6 used here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _tiny_text import tiny_t5_encoder, tiny_text_encoder, tiny_tokenizer

from kandinsky3.models.text_encoder import MAX_LENGTH, TextEncoder, cut_length

ATOL = 1e-5  # fp32 modules (T5 runs on the cut, the reference on all 128 slots: summation order differs)
CONTEXT_DIM = 24
D_MODEL = 32
SHORT = "a cat"
LONG = "a photograph of a cat sitting on a red chair in a cozy living room"
OVERLONG = "neon lights and rain " * 60  # far more than 128 tokens


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=D_MODEL, seed=0)


def n_tokens(prompt: str) -> int:
    """Untruncated token count including EOS, straight from the tokenizer."""
    return len(tiny_tokenizer()(prompt)["input_ids"])


def reference_original(encoder: TextEncoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """architecture §4.4 written out: T5 on 128 slots -> Linear -> LayerNorm -> zero pads -> cut to L."""
    tokens = tiny_tokenizer()(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        states = encoder.t5(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        linear, norm = encoder.projection
        context = F.layer_norm(states @ linear.weight.T, (CONTEXT_DIM,), norm.weight, norm.bias, eps=1e-5)
    context = context * tokens.attention_mask[..., None]
    length = min(MAX_LENGTH, int(tokens.attention_mask.sum(1).max()) + 1)
    return context[:, :length], tokens.attention_mask[:, :length].bool()


# --------------------------------------------------------------------------- tokenisation


def test_tiny_tokenizer_follows_t5_conventions():
    tokenizer = tiny_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(SHORT)["input_ids"]
    assert ids[-1] == 1 and 1 not in ids[:-1] and 0 not in ids
    assert tokenizer("")["input_ids"] == [1]


def test_tokenize_appends_eos_and_right_pads_to_128(encoder):
    input_ids, mask = encoder.tokenize([SHORT, LONG])
    assert input_ids.shape == mask.shape == (2, MAX_LENGTH)
    assert input_ids.dtype == mask.dtype == torch.int64
    for row, prompt in enumerate([SHORT, LONG]):
        n = n_tokens(prompt)
        assert input_ids[row, :n].tolist() == tiny_tokenizer()(prompt)["input_ids"]
        assert input_ids[row, n - 1] == 1 and (input_ids[row, n:] == 0).all()
        assert mask[row, :n].all() and not mask[row, n:].any()


def test_tokenize_matches_truncating_hf_tokenizer(encoder):
    prompts = [SHORT, LONG, OVERLONG, ""]
    expected = tiny_tokenizer()(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        input_ids, mask = encoder.tokenize(prompts)
    assert torch.equal(input_ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask)


def test_tokenize_truncates_to_128_including_eos_and_warns_cut_count(encoder):
    total = n_tokens(OVERLONG)
    assert total > MAX_LENGTH
    with pytest.warns(UserWarning, match=rf"{total - MAX_LENGTH} tokens were cut") as record:
        input_ids, mask = encoder.tokenize([SHORT, OVERLONG])
    assert "neon lights" in str(record[0].message)
    assert mask[1].sum() == MAX_LENGTH and input_ids[1, -1] == 1
    assert input_ids[1, :-1].tolist() == tiny_tokenizer()(OVERLONG)["input_ids"][: MAX_LENGTH - 1]


def test_tokenize_empty_prompt_gives_single_eos(encoder):
    input_ids, mask = encoder.tokenize("")
    assert input_ids.shape == (1, MAX_LENGTH)
    assert input_ids[0, 0] == 1 and mask[0].tolist() == [1] + [0] * (MAX_LENGTH - 1)


@pytest.mark.parametrize("bad", [None, 3, [SHORT, 3], [b"bytes"], ("ok", None)])
def test_tokenize_rejects_non_string_prompts(encoder, bad):
    with pytest.raises(TypeError, match="str"):
        encoder.tokenize(bad)


def test_tokenize_rejects_empty_batch(encoder):
    with pytest.raises(ValueError, match="empty"):
        encoder.tokenize([])


# --------------------------------------------------------------------------- original semantics


def test_encode_original_matches_manual_reference(encoder):
    prompts = [SHORT, LONG, ""]
    context, mask = encoder.encode(prompts)
    expected_context, expected_mask = reference_original(encoder, prompts)
    longest = max(n_tokens(p) for p in prompts)
    assert context.shape == (3, longest + 1, CONTEXT_DIM) and mask.dtype == torch.bool
    assert torch.equal(mask, expected_mask)
    assert (context - expected_context).abs().max().item() <= ATOL
    assert (context[~mask] == 0).all()  # pad slots are exactly zero after the projection
    assert (context[mask].abs().sum(-1) > 0).all()


def test_encode_prompt_filling_all_128_tokens_has_no_pad_slot(encoder):
    with pytest.warns(UserWarning, match="cut"):
        context, mask = encoder.encode([SHORT, OVERLONG])
        expected_context, expected_mask = reference_original(encoder, [SHORT, OVERLONG])
    assert context.shape[1] == MAX_LENGTH and mask[1].all()
    assert torch.equal(mask, expected_mask)
    assert (context - expected_context).abs().max().item() <= ATOL


def test_encode_tokens_equals_encode(encoder):
    input_ids, attention_mask = encoder.tokenize([LONG, SHORT])
    a, mask_a = encoder.encode_tokens(input_ids, attention_mask)
    b, mask_b = encoder.encode([LONG, SHORT])
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)


def test_cut_length_is_longest_plus_one_capped_at_n():
    assert cut_length(torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])) == 3
    assert cut_length(torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])) == 4


def test_encode_with_t5_overflow_zeroes_that_sample_and_warns():
    encoder = tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=D_MODEL, seed=0)
    token = tiny_tokenizer()("chair")["input_ids"][0]
    assert token not in tiny_tokenizer()(SHORT)["input_ids"]
    with torch.no_grad():
        encoder.t5.shared.weight[token] = float("inf")
        clean, clean_mask = encoder.encode([SHORT])
        with pytest.warns(UserWarning, match=r"samples \[1\]"):
            context, mask = encoder.encode([SHORT, "chair"])
    assert torch.isfinite(context).all() and not mask[1].any() and (context[1] == 0).all()
    assert torch.equal(context[:1, : clean.shape[1]], clean) and torch.equal(mask[:1, : clean.shape[1]], clean_mask)


# --------------------------------------------------------------------------- weights, dtype, grads


def test_load_projection_from_flat_dict(encoder):
    fresh = TextEncoder(tiny_t5_encoder(D_MODEL, seed=0), tiny_tokenizer(), context_dim=CONTEXT_DIM)
    flat = {key: value.detach() for key, value in encoder.projection.state_dict().items()}
    assert set(flat) == {"0.weight", "1.weight", "1.bias"}  # the 3.1 projection.pt layout
    fresh.load_projection(flat)
    assert all(torch.equal(a, b) for a, b in zip(fresh.projection.parameters(), encoder.projection.parameters()))
    format_30 = {"t5." + key: value * 2 for key, value in flat.items()}  # 3.0 `projections` entry
    fresh.load_projection(format_30 | {"other.weight": torch.zeros(1)}, prefix="t5.")
    assert torch.equal(fresh.projection[1].bias, encoder.projection[1].bias * 2)
    assert set(fresh.state_dict()) >= {"projection.0.weight", "projection.1.weight", "projection.1.bias", "null_embedding"}


def test_load_projection_rejects_bad_keys_and_shapes_without_partial_load():
    encoder = tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=D_MODEL, seed=0)
    before = {key: value.clone() for key, value in encoder.projection.state_dict().items()}
    bad = {key: torch.zeros_like(value) for key, value in before.items()}
    with pytest.raises(KeyError, match=r"missing \['1.bias'\]"):
        encoder.load_projection({"0.weight": bad["0.weight"], "1.weight": bad["1.weight"]})
    with pytest.raises(KeyError, match=r"unexpected \['2.weight'\]"):
        encoder.load_projection(bad | {"2.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1.bias has shape \(25,\)"):
        encoder.load_projection(bad | {"1.bias": torch.zeros(CONTEXT_DIM + 1)})
    with pytest.raises(KeyError, match="prefix 't5.'"):
        encoder.load_projection(bad, prefix="t5.")
    assert all(torch.equal(before[key], value) for key, value in encoder.projection.state_dict().items())
    with pytest.raises(ValueError, match="shape"):
        encoder.load_null_embedding(torch.zeros(CONTEXT_DIM + 1))


def test_context_dim_defaults_to_d_model():
    encoder = TextEncoder(tiny_t5_encoder(D_MODEL, seed=0), tiny_tokenizer())
    assert encoder.context_dim == encoder.d_model == D_MODEL
    assert encoder.null_embedding.shape == (D_MODEL,) and (encoder.null_embedding == 0).all()


def test_context_has_projection_dtype():
    encoder = tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=D_MODEL, seed=0)
    encoder.projection.double()
    with torch.no_grad():
        context, _ = encoder.encode(SHORT)
    assert context.dtype == torch.float64 and encoder.t5.dtype == torch.float32


def test_gradients_reach_projection_but_not_frozen_t5():
    encoder = tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=D_MODEL, seed=0).train()
    assert not encoder.t5.training and encoder.training
    context, mask = encoder.encode([SHORT, LONG])
    context[mask].square().sum().backward()
    assert encoder.projection[0].weight.grad is not None and encoder.projection[0].weight.grad.abs().sum() > 0
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in encoder.t5.parameters())


def test_unfrozen_t5_trains_and_receives_gradients():
    encoder = TextEncoder(tiny_t5_encoder(D_MODEL, seed=0), tiny_tokenizer(), freeze_t5=False).train()
    assert encoder.t5.training
    context, mask = encoder.encode(SHORT)
    context[mask].square().sum().backward()  # a plain sum of LayerNorm outputs has zero gradient
    assert encoder.t5.shared.weight.grad is not None and encoder.t5.shared.weight.grad.abs().sum() > 0


def test_encode_tokens_rejects_bad_inputs(encoder):
    input_ids, mask = encoder.tokenize(SHORT)
    with pytest.raises(ValueError, match="unsqueeze"):
        encoder.encode_tokens(input_ids[0], mask[0])
    with pytest.raises(ValueError, match="shape"):
        encoder.encode_tokens(input_ids, mask[:, :10])
    with pytest.raises(ValueError, match="right-padded"):
        encoder.encode_tokens(input_ids, mask.flip(1))
    with pytest.raises(ValueError, match="0 and 1"):
        encoder.encode_tokens(input_ids, mask * 2)
    with pytest.raises(TypeError, match="integer"):
        encoder.encode_tokens(input_ids.float(), mask)


def test_constructor_rejects_tokenizer_without_eos():
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        TextEncoder(tiny_t5_encoder(D_MODEL, seed=0), tokenizer)
