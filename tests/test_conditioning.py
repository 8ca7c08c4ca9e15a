"""kandinsky3.conditioning: both conditioning styles against diffusers, unconditional contexts, negative prompts,
the pad-slot rule, training conditions equal to inference conditions, and the inpainting channels.

Tolerances: comparisons with diffusers are fp32 with a different T5 length (diffusers runs all 128 slots, we run
the cut), so summation order differs: 1e-5. Everything that runs the same arithmetic here is compared exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny_models import tiny_movq_config
from _tiny_text import tiny_text_encoder, tiny_tokenizer

from kandinsky3 import conditioning as C
from kandinsky3.models.movq import MoVQ

ATOL = 1e-5
CONTEXT_DIM = 24
D_MODEL = 32
SHORT = "a cat"
LONG = "a photograph of a cat sitting on a red chair in a cozy living room"
NEGATIVE = "blurry, low quality, watermark, text, deformed hands, extra fingers, oil on canvas"
PROMPTS = [LONG, SHORT, "", "a green triangle on the left"]  # different lengths in one batch


@pytest.fixture(scope="module")
def encoder():
    return tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=D_MODEL, seed=0)


def n_tokens(prompt: str) -> int:
    """Token count including EOS, straight from the tokenizer."""
    return len(tiny_tokenizer()(prompt)["input_ids"])


def encode(encoder, prompts, negatives=None, style="original", guided=True):
    with torch.no_grad():
        return C.encode_prompts(encoder, prompts, negatives, style=style, guided=guided)


# --------------------------------------------------------------------------- diffusers oracle


@pytest.fixture(scope="module")
def diffusers_pipe(encoder):
    """diffusers' Kandinsky3Pipeline on the same tiny T5/tokenizer, projection copied into its U-Net."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.Kandinsky3UNet(
            in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=3,
            block_out_channels=(32, 64), cross_attention_dim=CONTEXT_DIM, encoder_hid_dim=D_MODEL,
        )
        movq = diffusers.VQModel(
            block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, layers_per_block=1,
            norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4,
        )
    with torch.no_grad():
        unet.encoder_hid_proj.projection_linear.weight.copy_(encoder.projection[0].weight)
        unet.encoder_hid_proj.projection_norm.weight.copy_(encoder.projection[1].weight)
        unet.encoder_hid_proj.projection_norm.bias.copy_(encoder.projection[1].bias)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", steps_offset=1, clip_sample=True)
    return diffusers.Kandinsky3Pipeline(
        tokenizer=tiny_tokenizer(), text_encoder=encoder.t5, unet=unet, scheduler=scheduler, movq=movq
    )


def diffusers_encode(pipe, prompts, negative_prompts=None):
    """Run diffusers' encode_prompt (cut context, as __call__ forces) and apply its U-Net projection."""
    with torch.no_grad():
        embeds, negative_embeds, mask, negative_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt=negative_prompts, device="cpu",
            _cut_context=True,
        )
        project = pipe.unet.encoder_hid_proj
        return (project(embeds), mask.bool()), (project(negative_embeds), negative_mask.bool())


def assert_close_condition(got, expected):
    assert got[0].shape == expected[0].shape and torch.equal(got[1], expected[1])
    assert (got[0] - expected[0]).abs().max().item() <= ATOL


def test_diffusers_style_matches_kandinsky3_pipeline_with_negative_prompts(encoder, diffusers_pipe):
    negatives = [NEGATIVE, ""]
    expected_cond, expected_negative = diffusers_encode(diffusers_pipe, [SHORT, LONG], negatives)
    conditions = encode(encoder, [SHORT, LONG], negatives, style="diffusers")
    assert n_tokens(negatives[0]) > conditions.cond[0].shape[1]  # the negative's tail and EOS are dropped
    assert_close_condition(conditions.cond, expected_cond)
    assert_close_condition(conditions.uncond, expected_negative)
    context, mask = conditions.cond  # pad slots are the LayerNorm bias, not zero
    assert torch.allclose(context[~mask], encoder.projection[1].bias.expand_as(context[~mask]), atol=ATOL)


def test_diffusers_style_negative_shorter_than_the_prompt_is_padded_with_the_bias(encoder, diffusers_pipe):
    expected_cond, expected_negative = diffusers_encode(diffusers_pipe, [LONG, LONG], ["x", ""])
    conditions = encode(encoder, [LONG, LONG], ["x", ""], style="diffusers")
    assert_close_condition(conditions.cond, expected_cond)
    assert_close_condition(conditions.uncond, expected_negative)


def test_diffusers_style_unconditional_matches_zero_embeddings(encoder, diffusers_pipe):
    expected_cond, expected_uncond = diffusers_encode(diffusers_pipe, [SHORT, LONG])
    conditions = encode(encoder, [SHORT, LONG], style="diffusers")
    assert_close_condition(conditions.cond, expected_cond)
    assert_close_condition(conditions.uncond, expected_uncond)
    assert not conditions.uncond[1].any()


def test_styles_differ_only_on_pad_slots(encoder):
    original, ported = encode(encoder, [SHORT, LONG]).cond, encode(encoder, [SHORT, LONG], style="diffusers").cond
    mask = original[1]
    assert torch.equal(mask, ported[1]) and torch.equal(original[0][mask], ported[0][mask])
    assert (original[0][~mask] == 0).all()
    assert (ported[0][~mask] - original[0][~mask]).abs().max().item() > 0.1  # LN bias vs 0


# --------------------------------------------------------------------------- unconditional contexts


def test_null_context_has_null_embedding_in_slot_0_only(encoder):
    context, mask = encode(encoder, [SHORT, LONG]).cond
    null_context, null_mask = C.null_context_like(encoder, context, mask)
    assert null_context.shape == context.shape and null_mask.shape == mask.shape
    assert torch.equal(null_context[:, 0], encoder.null_embedding.detach().expand(2, -1))
    assert (null_context[:, 1:] == 0).all()
    assert null_mask[:, 0].all() and not null_mask[:, 1:].any()
    assert torch.equal(encode(encoder, [SHORT, LONG]).uncond[0], null_context)  # the original style's uncond


def test_null_context_passes_gradient_to_null_embedding():
    encoder = tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=D_MODEL, seed=0)
    context, mask = torch.zeros(2, 5, CONTEXT_DIM), torch.ones(2, 5, dtype=torch.bool)
    null_context, _ = C.null_context_like(encoder, context, mask)
    null_context.sum().backward()
    assert torch.equal(encoder.null_embedding.grad, torch.full((CONTEXT_DIM,), 2.0))


def test_zero_context_is_the_projection_of_zero_states(encoder):
    context, mask = torch.zeros(2, 5, CONTEXT_DIM), torch.ones(2, 5, dtype=torch.bool)
    zero_context, zero_mask = C.zero_context_like(encoder, context, mask)
    with torch.no_grad():
        expected = encoder.projection(torch.zeros(2, 5, D_MODEL))
    assert torch.equal(zero_context, expected) and not zero_mask.any()


def test_unconditional_contexts_reject_wrong_shapes(encoder):
    context, mask = torch.zeros(1, 3, CONTEXT_DIM + 1), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="context_dim"):
        C.null_context_like(encoder, context, mask)
    with pytest.raises(ValueError, match="mask"):
        C.zero_context_like(encoder, torch.zeros(1, 3, CONTEXT_DIM), torch.ones(1, 4))


# --------------------------------------------------------------------------- prompts and negatives


def test_original_negatives_use_own_masks_and_a_common_length(encoder):
    conditions = encode(encoder, [SHORT, SHORT], [LONG, ""])
    alone, negative_alone = encode(encoder, [SHORT, SHORT], guided=False).cond, encode(encoder, [LONG, ""]).cond
    context, mask = conditions.cond
    length, own = n_tokens(LONG) + 1, alone[0].shape[1]
    assert context.shape == conditions.uncond[0].shape == (2, length, CONTEXT_DIM)
    assert torch.equal(context[:, :own], alone[0]) and (context[:, own:] == 0).all()
    assert torch.equal(mask[:, :own], alone[1]) and not mask[:, own:].any()
    assert torch.equal(conditions.uncond[0], negative_alone[0]) and torch.equal(conditions.uncond[1], negative_alone[1])
    assert conditions.uncond[1][0].sum() == n_tokens(LONG)  # the negative is not cut to the prompt


def test_encode_prompts_checks_style_guidance_and_negative_count(encoder):
    assert encode(encoder, [SHORT], ["x"], guided=False).uncond is None  # no guidance: negatives unused
    with pytest.raises(ValueError, match="2 negative prompts for a batch of 1"):
        encode(encoder, [SHORT], ["", ""])
    with pytest.raises(ValueError, match="conditioning must be one of"):
        encode(encoder, [SHORT], style="sdxl")


def test_pad_context_appends_masked_zero_slots_and_match_lengths_pads_the_shorter():
    context, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])
    padded, padded_mask = C.pad_context(context, mask, 5)
    assert padded.shape == (2, 5, 4) and padded_mask.dtype == torch.bool
    assert torch.equal(padded[:, :3], context) and (padded[:, 3:] == 0).all()
    assert padded_mask.tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    with pytest.raises(ValueError, match="shorten"):
        C.pad_context(context, mask, 2)
    short, long = (torch.ones(1, 2, 3), torch.ones(1, 2)), (torch.ones(1, 4, 3), torch.ones(1, 4))
    (a, mask_a), (b, _) = C.match_lengths(short, long)
    assert a.shape == b.shape == (1, 4, 3) and mask_a.tolist() == [[True, True, False, False]]


# --------------------------------------------------------------------------- pad-slot rule


@pytest.mark.parametrize("style", C.CONDITIONING_STYLES)
def test_pool_as_alone_gives_each_image_the_pooling_query_of_its_prompt_alone(encoder, style):
    """The unmasked mean over the batch's L slots equals the mean over the prompt's own n + 1 slots (its length
    alone), for cond and uncond; masks are unchanged and the own slots untouched."""
    conditions = encode(encoder, PROMPTS, style=style)
    pooled = C.pool_as_alone(conditions)
    for i, prompt in enumerate(PROMPTS):
        own = n_tokens(prompt) + 1
        for before, after in ((conditions.cond, pooled.cond), (conditions.uncond, pooled.uncond)):
            assert torch.equal(after[0][i, :own], before[0][i, :own]) and torch.equal(after[1], before[1])
            expected = before[0][i, :own].mean(dim=0)
            assert torch.allclose(after[0][i].mean(dim=0), expected, atol=1e-6)
    assert C.context_lengths(conditions).tolist() == [n_tokens(p) + 1 for p in PROMPTS]


def test_gather_conditions_cuts_a_mini_batch_to_its_longest_context(encoder):
    conditions = C.pool_as_alone(encode(encoder, PROMPTS))
    part = C.gather_conditions(conditions, slice(1, 3))  # SHORT and ""
    length = n_tokens(SHORT) + 1
    assert part.cond[0].shape == part.uncond[0].shape == (2, length, CONTEXT_DIM)
    assert torch.equal(part.cond[0], conditions.cond[0][1:3, :length])
    assert torch.equal(part.uncond[1], conditions.uncond[1][1:3, :length])


# --------------------------------------------------------------------------- training == inference


def reference_training_conditioning(encoder, input_ids, attention_mask, drop):
    """The trainer's conditioning as it was written before this module existed (original style)."""
    length = min(attention_mask.shape[1], int(attention_mask.sum(dim=1).max()) + 1)
    context, mask = encoder.encode_tokens(input_ids[:, :length], attention_mask[:, :length])
    null_context, null_mask = C.null_context_like(encoder, context, mask)
    context = torch.where(drop[:, None, None], null_context, context)
    mask = torch.where(drop[:, None], null_mask, mask)
    own = (attention_mask.sum(dim=1) + 1).clamp(max=encoder.max_length)
    head = torch.arange(context.shape[1])[None, :] < own[:, None]
    mean = (context * head[..., None]).sum(dim=1, keepdim=True) / own[:, None, None]
    return torch.where(head[..., None], context, mean.to(context.dtype)), mask


@pytest.mark.parametrize("style", C.CONDITIONING_STYLES)
def test_training_batch_and_inference_call_get_identical_conditioning(encoder, style):
    """Captions of different lengths in one training batch, some dropped: each kept sample's (context, mask) is
    bit-identical to the cond the sampler gets for that prompt, each dropped one to the uncond."""
    drop = torch.tensor([False, True, False, True])
    ids, mask = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        context, context_mask = C.training_conditions(encoder, ids, mask, drop, style=style)
        inference = C.pool_as_alone(C.encode_prompts(encoder, PROMPTS, None, style=style, guided=True))
    for i, dropped in enumerate(drop.tolist()):
        expected = inference.uncond if dropped else inference.cond
        assert torch.equal(context[i], expected[0][i]) and torch.equal(context_mask[i], expected[1][i]), i
    if style == C.ORIGINAL:
        with torch.no_grad():
            reference = reference_training_conditioning(encoder, ids, mask, drop)
        assert torch.equal(context, reference[0]) and torch.equal(context_mask, reference[1])


def test_training_conditions_train_the_projection_and_the_null_embedding():
    encoder = tiny_text_encoder(context_dim=CONTEXT_DIM, d_model=D_MODEL, seed=0).train()
    ids, mask = encoder.tokenize([SHORT, LONG])
    context, context_mask = C.training_conditions(encoder, ids, mask, torch.tensor([False, True]))
    context[context_mask].square().sum().backward()
    assert encoder.projection[0].weight.grad.abs().sum() > 0 and encoder.null_embedding.grad.abs().sum() > 0


# --------------------------------------------------------------------------- inpainting channels


class RecordingMoVQ(torch.nn.Module):
    """A stand-in MoVQ (fp64, 2x down): records what it encodes; latent = [2x2 mean of the image, ones]."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.seen = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        pooled = F.avg_pool2d(images, 2) * self.scale  # (B,3,H/2,W/2)
        return torch.cat([pooled, torch.ones_like(pooled[:, :1])], dim=1)  # (B,4,H/2,W/2)


def test_inpainting_channels_keep_mask_nearest_resized_and_kept_pixels_unchanged():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    repaint = torch.zeros(2, 1, 8, 8)
    repaint[0, :, 2:5, 1:6] = 1.0
    repaint[1, :, 4:, :] = 0.5  # partly repainted pixels (a soft mask edge) count as repainted
    movq = RecordingMoVQ()
    channels = C.inpainting_channels(movq, pixels, repaint)
    assert channels.shape == (2, 5, 4, 4) and channels.dtype == torch.float32 and not channels.requires_grad
    (encoded,) = movq.seen
    keep = repaint == 0  # (2,1,8,8)
    assert encoded.dtype == torch.float64  # encoded in the MoVQ's dtype
    assert torch.equal(encoded.float()[keep.expand_as(pixels)], pixels[keep.expand_as(pixels)])
    assert (encoded[~keep.expand_as(pixels)] == 0).all()
    assert torch.equal(channels[:, :1], (1 - repaint)[:, :, ::2, ::2])  # nearest: the top-left pixel of each 2x2
    assert torch.equal(channels[:, 1:], movq.encode(encoded).float())


def test_inpainting_channels_of_a_real_movq_are_the_masked_image_latent():
    movq = MoVQ(tiny_movq_config()).eval()
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    repaint = torch.zeros(1, 1, 16, 16)
    repaint[..., :8, :] = 1.0
    channels = C.inpainting_channels(movq, pixels, repaint)
    with torch.no_grad():
        expected = movq.encode(pixels * (1 - repaint))
    assert channels.shape == (1, 5, 8, 8) and torch.equal(channels[:, 1:], expected)
    assert channels[0, 0, :4].eq(0).all() and channels[0, 0, 4:].eq(1).all()
