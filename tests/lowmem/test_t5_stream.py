"""The block-streamed T5 encoder equals the fully loaded one, holds only one block, and is picked by "auto"."""

from __future__ import annotations

import pytest
import torch

from kandinsky3.lowmem.storage import compute_dtype, compute_in, is_streamed
from kandinsky3.lowmem.t5_stream import load_streamed_t5, should_stream, t5_parameter_count, t5_weight_bytes
from tests._checkpoints import _save_bin_shards
from tests._tiny_text import tiny_t5_encoder


def _inputs(vocab: int, batch: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, 5:] = 0  # a padded row
    mask[2, 2:] = 0
    return ids, mask


def _materialised_block_params(model) -> int:
    """Streamed parameters (embedding, blocks) currently in memory: only the final norm stays resident."""
    return sum(1 for name, p in model.named_parameters() if "final_layer_norm" not in name and not p.is_meta)


@pytest.mark.parametrize("prefetch", [True, False])
def test_streamed_equals_loaded_safetensors(tmp_path, prefetch):
    reference = tiny_t5_encoder()
    reference.save_pretrained(str(tmp_path))
    streamed = load_streamed_t5(tmp_path, prefetch=prefetch)
    assert is_streamed(streamed) and not is_streamed(reference)
    assert _materialised_block_params(streamed) == 0
    ids, mask = _inputs(reference.config.vocab_size)
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask)[0]
        first = streamed(input_ids=ids, attention_mask=mask)[0]
        second = streamed(input_ids=ids, attention_mask=mask)[0]  # blocks are read again
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)
    assert _materialised_block_params(streamed) == 0, "blocks must be freed after the forward pass"


def test_streamed_from_bin_shards_in_bf16(tmp_path):
    reference = tiny_t5_encoder()
    reference.config.save_pretrained(str(tmp_path))
    _save_bin_shards(reference, tmp_path)  # the 3.1 flan_ul2_encoder layout
    streamed = load_streamed_t5(tmp_path, dtype=torch.bfloat16)
    reference_bf16 = tiny_t5_encoder().to(torch.bfloat16)
    ids, mask = _inputs(reference.config.vocab_size)
    with torch.inference_mode():
        expected = reference_bf16(input_ids=ids, attention_mask=mask)[0]
        got = streamed(input_ids=ids, attention_mask=mask)[0]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_fp16_keeps_wo_in_fp32_while_it_runs(tmp_path):
    reference = tiny_t5_encoder()
    reference.save_pretrained(str(tmp_path))
    streamed = load_streamed_t5(tmp_path, dtype=torch.float16, prefetch=False)
    seen = {}

    def record(module, args):
        seen[module] = module.weight.dtype

    for block in streamed.encoder.block:
        block.layer[1].DenseReluDense.wo.register_forward_pre_hook(record)
    ids, mask = _inputs(reference.config.vocab_size)
    with torch.inference_mode():
        streamed(input_ids=ids, attention_mask=mask)
    assert set(seen.values()) == {torch.float32}
    assert streamed.encoder.final_layer_norm.weight.dtype == torch.float16


def test_auto_rule_compares_size_with_free_memory(tmp_path):
    reference = tiny_t5_encoder()
    reference.save_pretrained(str(tmp_path))
    parameters = sum(p.numel() for p in reference.parameters())
    assert t5_weight_bytes(tmp_path, None, torch.bfloat16) == 2 * parameters
    assert t5_weight_bytes(tmp_path, None, None) == 4 * parameters
    assert t5_parameter_count(tmp_path, None) == parameters
    assert not should_stream(tmp_path, None, None, "cpu")  # a few KB never needs streaming
    assert not should_stream(tmp_path / "missing", None, None, "cpu")


def test_to_moves_and_casts_the_resident_part_and_later_blocks(tmp_path):
    reference = tiny_t5_encoder()
    reference.save_pretrained(str(tmp_path))
    streamed = load_streamed_t5(tmp_path).to("cpu").to(torch.bfloat16)
    assert _materialised_block_params(streamed) == 0
    ids, mask = _inputs(reference.config.vocab_size)
    with torch.inference_mode():
        expected = reference.to(torch.bfloat16)(input_ids=ids, attention_mask=mask)[0]
        got = streamed(input_ids=ids, attention_mask=mask)[0]
    assert torch.equal(got, expected)


def test_compute_in_casts_a_streamed_t5_which_then_reads_its_weights_in_that_dtype(tmp_path):
    reference = tiny_t5_encoder()
    reference.save_pretrained(str(tmp_path))  # fp32 files
    streamed = compute_in(load_streamed_t5(tmp_path, dtype=torch.bfloat16), torch.float32)
    assert compute_dtype(streamed) == torch.float32
    assert streamed.encoder.final_layer_norm.weight.dtype == torch.float32
    assert not any("parametrizations" in name for name, _ in streamed.named_modules())
    ids, mask = _inputs(reference.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(streamed(input_ids=ids, attention_mask=mask)[0],
                           reference(input_ids=ids, attention_mask=mask)[0])


def test_a_block_that_fails_still_drops_its_weights(tmp_path):
    reference = tiny_t5_encoder()
    reference.save_pretrained(str(tmp_path))
    streamed = load_streamed_t5(tmp_path)

    def fail(module, args):
        raise RuntimeError("interrupted")

    handle = streamed.encoder.block[1].layer[0].register_forward_pre_hook(fail)
    ids, mask = _inputs(reference.config.vocab_size)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="interrupted"):
            streamed(input_ids=ids, attention_mask=mask)
        assert _materialised_block_params(streamed) == 0
        handle.remove()
        assert torch.equal(streamed(input_ids=ids, attention_mask=mask)[0],
                           reference(input_ids=ids, attention_mask=mask)[0])


def test_text_encoder_and_factory_options(tmp_path):
    from kandinsky3.weights import load_components, load_text_encoder, save_native
    from tests._checkpoints import write_native

    (tmp_path / "model").mkdir()
    written = write_native(tmp_path / "model")
    whole = load_text_encoder(written.root, stream_t5=False)
    streamed = load_text_encoder(written.root, stream_t5=True)
    assert is_streamed(streamed.t5) and not is_streamed(whole.t5)
    with torch.inference_mode():
        a, mask_a = whole.encode(["a cat on a red chair", "a city at night"])
        b, mask_b = streamed.encode(["a cat on a red chair", "a city at night"])
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    with pytest.raises(ValueError, match="stream_t5"):
        load_text_encoder(written.root, stream_t5="sometimes")
    parts = load_components(written.root, components=("text_encoder",), stream_t5=True)
    with pytest.raises(ValueError, match="holds no weights to save"):
        save_native(parts, tmp_path / "out")
