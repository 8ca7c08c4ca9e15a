"""MoVQ autoencoder: parity with diffusers' VQModel(norm_type="spatial"), key conversion, config, quantiser.

The oracle is diffusers' VQModel with every parameter randomised (practice §10.1): its state dict is converted with
``diffusers_to_original_movq`` and loaded strictly into ``MoVQ``; outputs are compared in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import randomize_near_identity_

from kandinsky3.models.movq import MoVQ, MoVQConfig, VectorQuantizer, codebook_perplexity, count_parameters
from kandinsky3.weights.movq_keys import (
    diffusers_to_original_movq,
    original_to_diffusers_keys,
    original_to_diffusers_movq,
)

diffusers = pytest.importorskip("diffusers")

# fp32 tolerance: both implementations run the same conv/GroupNorm/SDPA kernels in the same order, so only
# reassociation-level rounding differs (outputs are O(1-10), fp32 eps 1.2e-7); 1e-5 leaves ~10x headroom.
PARITY_ATOL = 1e-5

# Two levels, attention at the lowest resolution: diffusers' fast-test MoVQ with widths multiple of 32
# (diffusers' SpatialNorm hard-codes 32 groups).
TINY = MoVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), resolution=64, z_channels=4)
# Four levels, attention at levels 1 and 3, 3 latent channels, non-square inputs.
DEEP = MoVQConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2, attn_resolutions=(32, 8), resolution=64, z_channels=3)


def _diffusers_vq(config: MoVQConfig, num_vq_embeddings: int = 12) -> "diffusers.VQModel":
    levels = range(config.num_levels)
    down = ["AttnDownEncoderBlock2D" if config.has_attention(i) else "DownEncoderBlock2D" for i in levels]
    up = ["AttnUpDecoderBlock2D" if config.has_attention(i) else "UpDecoderBlock2D" for i in reversed(levels)]
    return diffusers.VQModel(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(config.widths),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_groups,
        norm_type="spatial",
        num_vq_embeddings=num_vq_embeddings,
        vq_embed_dim=config.z_channels,
    )


@torch.no_grad()
def _oracle_pair(config: MoVQConfig, seed: int, num_vq_embeddings: int = 12):
    vq = _diffusers_vq(config, num_vq_embeddings).eval()
    randomize_near_identity_(vq, seed)
    ours = MoVQ(config).eval()
    ours.load_state_dict(diffusers_to_original_movq(vq.state_dict(), config), strict=True)
    return vq, ours


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["default", "channels_last"])
@pytest.mark.parametrize("config, shape", [(TINY, (2, 3, 16, 16)), (DEEP, (2, 3, 24, 16))], ids=["tiny", "deep"])
def test_movq_matches_diffusers_vqmodel_encode_and_decode(config, shape, layout):
    """In both memory formats: the trainers move the MoVQ to channels-last (faster on CPU), the pipelines do not."""
    vq, ours = _oracle_pair(config, seed=0)
    ours = ours.to(memory_format=layout)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_z = vq.encode(x).latents
        z = ours.encode(x)
        ref_img = vq.decode(ref_z, force_not_quantize=True).sample
        img = ours.decode(ref_z)
    enc_err, dec_err = (z - ref_z).abs().max().item(), (img - ref_img).abs().max().item()
    print(f"\n{shape}: encode max|diff| {enc_err:.3e} (|z| max {ref_z.abs().max():.2f}), "
          f"decode max|diff| {dec_err:.3e} (|x| max {ref_img.abs().max():.2f})")
    f = config.downsample_factor
    assert z.shape == (shape[0], config.z_channels, shape[2] // f, shape[3] // f)
    assert img.shape == (shape[0], config.out_ch, shape[2], shape[3])
    assert enc_err <= PARITY_ATOL and dec_err <= PARITY_ATOL
    assert ref_img.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    if layout == torch.channels_last:  # it runs its layers in that layout whatever the input's (the speed is there)
        assert z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()
        assert img.is_contiguous(memory_format=torch.channels_last) and not img.is_contiguous()


def test_channels_last_training_step_matches_the_default_layout():
    """The MoVQ trainer's layout: the same loss and gradients (to float rounding), gradients stored like the weights."""
    config = MoVQConfig(**{**TINY.to_dict(), "codebook_size": 16})
    default = randomize_near_identity_(MoVQ(config), seed=4).train()
    fast = MoVQ(config).train()
    fast.load_state_dict(default.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = []
    for model in (default, fast):
        recon, qloss, _ = model(x, generator=torch.Generator().manual_seed(1))
        loss = (recon - x).abs().mean() + qloss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for (name, a), b in zip(default.named_parameters(), fast.parameters()):
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    for conv in (fast.encoder.conv_in, fast.decoder.conv_out):  # 3×3 weights and their gradients stay channels-last
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_quantised_decode_matches_diffusers_codebook_path():
    config = MoVQConfig(**{**TINY.to_dict(), "codebook_size": 12})
    vq, ours = _oracle_pair(config, seed=2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z = vq.encode(x).latents
        ref = vq.decode(z)  # snaps z to the codebook
        zq, loss, indices = ours.quantize_latents(z)
        img = ours.decode(zq)
    err = (img - ref.sample).abs().max().item()
    print(f"\nquantised decode max|diff| {err:.3e}, codes used {indices.unique().numel()}/12")
    assert err <= PARITY_ATOL
    assert torch.allclose(loss, ref.commit_loss.reshape(()), atol=1e-6)


def test_decode_in_chunks_equals_whole_batch():
    model = MoVQ(TINY).eval()
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z, chunk_size=2), model.decode(z), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- key conversion


def test_original_to_diffusers_to_original_round_trip_is_identity():
    model = MoVQ(DEEP)
    randomize_near_identity_(model, seed=4)
    sd = model.state_dict()
    back = diffusers_to_original_movq(original_to_diffusers_movq(sd, DEEP), DEEP)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_diffusers_to_original_to_diffusers_round_trip_is_identity():
    vq = _diffusers_vq(DEEP)
    randomize_near_identity_(vq, seed=5)
    sd = vq.state_dict()
    codebook = sd["quantize.embedding.weight"]
    back = original_to_diffusers_movq(diffusers_to_original_movq(sd, DEEP), DEEP, codebook=codebook)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    vq.load_state_dict(back, strict=True)


def test_codebook_is_mapped_and_training_state_started_fresh():
    config = MoVQConfig(**{**TINY.to_dict(), "codebook_size": 12, "codebook_ema": True})
    vq = _diffusers_vq(config)
    randomize_near_identity_(vq, seed=6)
    converted = diffusers_to_original_movq(vq.state_dict(), config)
    assert torch.equal(converted["quantize.embedding.weight"], vq.quantize.embedding.weight)
    assert torch.equal(converted["quantize.embed_sum"], vq.quantize.embedding.weight)
    MoVQ(config).load_state_dict(converted, strict=True)
    back = original_to_diffusers_movq(converted, config)
    assert set(back) == set(vq.state_dict())


def test_converter_names_missing_unexpected_and_misshapen_keys():
    sd = MoVQ(TINY).state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['decoder.conv_in.bias'\]"):
        original_to_diffusers_movq({k: v for k, v in sd.items() if k != "decoder.conv_in.bias"}, TINY)
    with pytest.raises(ValueError, match="unexpected keys.*decoder.extra"):
        original_to_diffusers_movq({**sd, "decoder.extra": torch.zeros(1)}, TINY)
    dsd = original_to_diffusers_movq(sd, TINY)
    dsd["encoder.mid_block.attentions.0.to_q.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ValueError, match=r"wrong shapes.*to_q.weight: \(64, 64, 1, 1\) != \(64, 64\)"):
        diffusers_to_original_movq(dsd, TINY)
    with pytest.raises(ValueError, match="codebook must be"):
        original_to_diffusers_movq(sd, TINY, codebook=torch.zeros(12, 3))


def test_full_size_key_table_matches_diffusers_vqmodel_layout():
    config = MoVQConfig.kandinsky3()
    with torch.device("meta"):
        vq = _diffusers_vq(config, num_vq_embeddings=16384)
    dsd = vq.state_dict()
    assert len(dsd) == 431 and sum(p.numel() for p in vq.parameters()) == 270_669_103
    converted = diffusers_to_original_movq(dsd, config)
    assert len(converted) == 430
    with torch.device("meta"):
        MoVQ(config).load_state_dict(converted, strict=True, assign=True)
    table = original_to_diffusers_keys(config)
    assert table["decoder.up.0.block.2.norm1.conv_y.weight"] == "decoder.up_blocks.3.resnets.2.norm1.conv_y.weight"
    assert table["decoder.up.3.attn.2.proj_out.bias"] == "decoder.up_blocks.0.attentions.2.to_out.0.bias"
    assert table["encoder.down.3.attn.1.q.weight"] == "encoder.down_blocks.3.attentions.1.to_q.weight"


# ------------------------------------------------------------------------------------------ released config


def test_released_movq_has_270m_parameters_and_original_key_names():
    with torch.device("meta"):
        model = MoVQ(MoVQConfig.kandinsky3())
    assert count_parameters(model) == 270_603_567
    assert count_parameters(model.encoder) == 109_485_316
    assert count_parameters(model.decoder) == 161_118_211
    sd = model.state_dict()
    assert len(sd) == 430 and model.quantize is None
    assert sd["encoder.down.3.attn.1.q.weight"].shape == (1024, 1024, 1, 1)
    assert sd["decoder.up.0.block.2.norm1.conv_y.weight"].shape == (256, 4, 1, 1)
    assert sd["decoder.up.3.attn.2.proj_out.bias"].shape == (1024,)
    assert sd["encoder.down.0.block.0.norm1.norm_layer.weight"].shape == (256,)
    assert sd["decoder.norm_out.conv_b.weight"].shape == (256, 4, 1, 1)
    assert {k.split(".upsample")[0] for k in sd if ".upsample." in k} == {f"decoder.up.{i}" for i in (1, 2, 3)}
    assert {k.split(".downsample")[0] for k in sd if ".downsample." in k} == {f"encoder.down.{i}" for i in (0, 1, 2)}
    assert {k.split(".attn.")[0] for k in sd if ".attn." in k} == {"encoder.down.3", "decoder.up.3"}
    assert "encoder.down.1.block.0.nin_shortcut.weight" in sd and "decoder.up.2.block.0.nin_shortcut.weight" in sd
    assert MoVQConfig.kandinsky3().downsample_factor == 8


# --------------------------------------------------------------------------------------- validation errors


def test_encode_rejects_wrong_channels_rank_and_size_not_divisible():
    model = MoVQ(DEEP)
    with pytest.raises(ValueError, match=r"expects \(B,3,H,W\)"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"expects \(B,3,H,W\)"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 8"):
        model.encode(torch.zeros(1, 3, 20, 16))


def test_decode_rejects_wrong_latent_channels():
    with pytest.raises(ValueError, match=r"expects \(B,3,h,w\) latents"):
        MoVQ(DEEP).decode(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ch": 48}, "not divisible by norm_groups=32"),
        ({"norm_groups": 24}, "not divisible by norm_groups=24"),
        ({"double_z": True}, "double_z=True"),
        ({"ch_mult": ()}, "at least one level"),
        ({"ch_mult": (1, 0)}, "ch_mult entry"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"attn_resolutions": (16,)}, r"attn_resolutions \[16\] match no level"),
        ({"dropout": 1.0}, "dropout"),
        ({"z_channels": True}, "z_channels"),
        ({"codebook_ema": True}, "codebook_size > 0"),
        ({"codebook_size": 8, "codebook_ema_decay": 1.0}, "codebook_ema_decay"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoVQConfig(**{**TINY.to_dict(), **overrides})


def test_config_json_round_trip_and_key_errors():
    data = json.loads(json.dumps(DEEP.to_dict()))
    assert MoVQConfig.from_dict(data) == DEEP
    with pytest.raises(ValueError, match=r"unknown keys \['heads'\], missing keys \[\]"):
        MoVQConfig.from_dict({**data, "heads": 1})
    data.pop("z_channels")
    with pytest.raises(ValueError, match=r"missing keys \['z_channels'\]"):
        MoVQConfig.from_dict(data)


def test_quantize_latents_without_codebook_is_an_error():
    with pytest.raises(ValueError, match="no codebook"):
        MoVQ(TINY).quantize_latents(torch.zeros(1, 4, 2, 2))


# ------------------------------------------------------------------------------------------------ quantiser


def test_training_forward_passes_straight_through_gradient_to_encoder():
    config = MoVQConfig(**{**TINY.to_dict(), "codebook_size": 16, "codebook_restart_after": 1})
    model = MoVQ(config).train()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    recon, qloss, info = model(x, generator=torch.Generator().manual_seed(1))
    assert recon.shape == x.shape and info["indices"].shape == (2, 8, 8) and info["indices"].dtype == torch.long
    assert torch.isfinite(qloss) and qloss > 0 and 1.0 <= info["perplexity"] <= 16
    recon.square().mean().backward(retain_graph=True)  # reconstruction only: reaches the encoder via the estimator
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    qloss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_quantiser_loss_indices_and_eval_mode_leaves_state_alone():
    vq = VectorQuantizer(6, 2, beta=0.25).eval()
    z = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    q, loss, idx = vq(z)
    assert q.shape == z.shape and idx.shape == (2, 3, 5)
    torch.testing.assert_close(q, vq.lookup(idx))
    torch.testing.assert_close(loss, 1.25 * (q - z).square().mean())
    assert all(torch.equal(v, state[k]) for k, v in vq.state_dict().items())


def test_ema_update_moves_codes_toward_assigned_inputs():
    vq = VectorQuantizer(3, 2, use_ema=True, ema_decay=0.5).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-50.0, 50.0]]))
        for name, value in vq.initial_state(vq.embedding.weight).items():
            getattr(vq, name).copy_(value)
    assert not vq.embedding.weight.requires_grad
    targets = torch.tensor([[1.0, 1.0], [9.0, 11.0]])
    z = targets.repeat(4, 1).reshape(1, 4, 2, 2).permute(0, 3, 1, 2)  # (1,2,4,2): each target 4 times
    before = vq.embedding.weight.clone()
    _, loss, idx = vq(z)
    after = vq.embedding.weight
    assert set(idx.unique().tolist()) == {0, 1}
    for code in (0, 1):
        assert (after[code] - targets[code]).norm() < (before[code] - targets[code]).norm()
    # cluster (1 + 0.5·(4-1)) with sum (c + 0.5·(4t - c)) / cluster: mean of old code and new inputs
    torch.testing.assert_close(after[0], (0.5 * before[0] + 0.5 * 4 * targets[0]) / (0.5 + 0.5 * 4))
    assert torch.equal(after[2], before[2])  # unused code keeps its value
    q_before = before[idx].permute(0, 3, 1, 2)  # (1,2,4,2) codes before the update
    torch.testing.assert_close(loss, 0.25 * (q_before - z).square().mean())  # commitment term only under EMA


def test_dead_codes_are_restarted_from_batch_vectors():
    vq = VectorQuantizer(5, 2, restart_after=2).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [100.0, 0], [0, 100.0], [-100.0, 0], [0, -100.0]]))
    z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="generator"):
        vq(z)
    g = torch.Generator().manual_seed(1)
    vq(z, generator=g)
    assert vq.steps_unused.tolist() == [0, 1, 1, 1, 1] and vq.usage()["stale_codes"] == 4
    vq(z, generator=g)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in range(1, 5):  # each restarted code is one of the batch vectors
        assert (vq.embedding.weight[code] - flat).abs().sum(1).min() == 0
    assert vq.steps_unused.tolist() == [0] * 5
    usage = vq.usage()
    assert usage["stale_codes"] == 0 and 1.0 <= usage["perplexity"] <= 5.0


def test_codebook_perplexity_ranges_from_one_to_num_codes():
    assert codebook_perplexity(torch.zeros(10, dtype=torch.long), 4).item() == pytest.approx(1.0)
    assert codebook_perplexity(torch.arange(8) % 4, 4).item() == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------------------- bf16


def test_bf16_encode_decode_stays_close_to_fp32():
    model = MoVQ(TINY).eval()
    randomize_near_identity_(model, seed=7)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        z32 = model.encode(x)
        img32 = model.decode(z32)
        model.to(torch.bfloat16)
        z16 = model.encode(x.bfloat16())
        img16 = model.decode(z32.bfloat16())
    assert z16.dtype == img16.dtype == torch.bfloat16
    z_err = ((z16.float() - z32).abs().max() / z32.abs().max()).item()
    img_err = ((img16.float() - img32).abs().max() / img32.abs().max()).item()
    print(f"\nbf16 relative max|diff|: encode {z_err:.3e}, decode {img_err:.3e}")
    # bf16 keeps 8 mantissa bits (rel. step 3.9e-3); ~15 layers of accumulated rounding stay within a few %.
    assert z_err < 0.05 and img_err < 0.05


def test_in_place_inference_path_is_bit_identical_to_the_autograd_path():
    """Without autograd the decoder adds and activates in place (less memory); the numbers must not change."""
    config = MoVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, z_channels=4)
    model = randomize_near_identity_(MoVQ(config), seed=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        expected_latents = model.encode(x)
        expected = model.decode(expected_latents)
    assert expected.requires_grad
    with torch.inference_mode():
        latents = model.encode(x)
        decoded = model.decode(latents)
    assert torch.equal(latents, expected_latents.detach())
    assert torch.equal(decoded, expected.detach())
