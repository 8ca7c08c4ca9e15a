"""U-Net: structure, key names and numerical parity with diffusers' Kandinsky3UNet.

Tolerance: 1e-5 max-abs in fp32.  Both sides compute the same float32 operations in a
different order (diffusers adds a -10000 bias where we pass a boolean mask, and builds its
attention from separate kernels), so differences are rounding only (~1e-6 observed).
"""


import pytest
import torch
from _tiny_models import randomize_
from diffusers import Kandinsky3UNet
from diffusers.pipelines.kandinsky3.convert_kandinsky3_unet import convert_state_dict

from kandinsky3.models.unet import UNet, UNetConfig, masked_attention
from kandinsky3.weights.unet_keys import diffusers_to_original_unet, original_to_diffusers_unet

DIFFUSERS_CONFIGS = {
    # diffusers' own fast-test config (2 levels: every up level has attention, practice §10.2)
    "fast_test": dict(
        in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=3,
        block_out_channels=(32, 64), cross_attention_dim=4, encoder_hid_dim=32,
    ),
    # all four levels with self- and cross-attention at the three lower ones
    "four_levels": dict(
        in_channels=4, time_embedding_dim=64, groups=8, attention_head_dim=16, layers_per_block=2,
        block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, encoder_hid_dim=48,
    ),
    "three_levels": dict(
        in_channels=4, time_embedding_dim=64, groups=8, attention_head_dim=16, layers_per_block=3,
        block_out_channels=(32, 64, 128), cross_attention_dim=32, encoder_hid_dim=16,
    ),
}


def make_pair(name: str, seed: int = 0):
    """A random diffusers Kandinsky3UNet and our UNet holding the same weights."""
    cfg = DIFFUSERS_CONFIGS[name]
    reference = Kandinsky3UNet(**cfg).eval()
    randomize_(reference, seed)
    unet_sd, projection_sd = diffusers_to_original_unet(reference.state_dict())
    ours = UNet(UNetConfig.from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(unet_sd, strict=True)
    projection = torch.nn.Sequential(
        torch.nn.Linear(cfg["encoder_hid_dim"], cfg["cross_attention_dim"], bias=False),
        torch.nn.LayerNorm(cfg["cross_attention_dim"]),
    )
    projection.load_state_dict(projection_sd, strict=True)
    return reference, ours, projection


def random_inputs(batch, channels, side, hid_dim, length=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, side, side, generator=gen)
    raw = torch.randn(batch, length, hid_dim, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = 1  # one sample with a single real token
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (B, L) right-padded
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t, raw, mask


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CONFIGS))
def test_unet_matches_diffusers_fp32(name):
    reference, ours, projection = make_pair(name)
    cfg = DIFFUSERS_CONFIGS[name]
    side = 8 * ours.config.downsample_factor
    x, t, raw, mask = random_inputs(3, 4, side, cfg["encoder_hid_dim"])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=raw, encoder_attention_mask=mask.float()).sample
        got = ours(x, t, projection(raw), mask)
    diff = (got - expected).abs().max().item()
    print(f"{name}: max-abs diff vs diffusers = {diff:.3e} (output scale {expected.abs().max():.2f})")
    assert got.shape == expected.shape
    assert diff <= 1e-5


def test_unet_bf16_forward_stays_close_to_fp32():
    _, ours, projection = make_pair("four_levels", seed=3)
    x, t, raw, mask = random_inputs(2, 4, 16, 48)
    with torch.no_grad():
        context = projection(raw)
        full = ours(x, t, context, mask)
        half = ours.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16(), mask)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    rel = ((half.float() - full).norm() / full.norm()).item()
    print(f"bf16 relative error {rel:.3e}")
    assert rel < 5e-2


def test_unet_fp16_mask_stays_finite_with_fully_masked_sample():
    _, ours, projection = make_pair("fast_test", seed=4)
    x, t, raw, mask = random_inputs(2, 4, 16, 32)
    mask[1] = False
    with torch.no_grad():
        out = ours.half()(x.half(), t, projection(raw).half(), mask)
    assert torch.isfinite(out).all()


def reference_masked_attention(q, k, v, mask):
    """The original's einsum attention: masked logits = -max finite value, then softmax."""
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~mask[:, None, None, :], -torch.finfo(logits.dtype).max)
    return torch.einsum("bhqk,bhkd->bhqd", logits.softmax(dim=-1), v)


def test_masked_attention_matches_original_semantics_including_all_masked_rows():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=gen) for _ in range(3))
    k, v = k[:, :, :4], v[:, :, :4]
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    got = masked_attention(q, k, v, mask)
    assert (got - reference_masked_attention(q, k, v, mask)).abs().max() < 1e-6
    assert torch.allclose(got[1], v[1].mean(dim=1, keepdim=True).expand_as(got[1]), atol=1e-6)


def test_full_size_presets_have_the_published_parameter_counts():
    with torch.device("meta"):
        base = UNet(UNetConfig.kandinsky3())
        inpainting = UNet(UNetConfig.kandinsky3_inpainting())
    assert sum(p.numel() for p in base.parameters()) == 3_038_562_820
    assert sum(p.numel() for p in inpainting.parameters()) == 3_038_571_460
    state = base.state_dict()
    assert len(state) == 1068
    assert tuple(inpainting.state_dict()["in_layer.weight"].shape) == (192, 9, 3, 3)
    shapes = {  # architecture §2.10 examples
        "to_time_embed.1.weight": (1536, 192),
        "feature_pooling.attention.to_key.weight": (1536, 4096),
        "feature_pooling.attention.output_layer.weight": (1536, 1536),
        "out_layer.0.weight": (192,),
        "down_samples.1.resnet_attn_blocks.0.0.resnet_blocks.0.group_norm.context_mlp.1.weight": (768, 1536),
        "down_samples.1.resnet_attn_blocks.0.0.resnet_blocks.0.projection.weight": (384, 384, 1, 1),
        "down_samples.1.resnet_attn_blocks.0.0.shortcut_projection.weight": (768, 384, 1, 1),
        "down_samples.0.resnet_attn_blocks.2.2.resnet_blocks.2.down_sample.weight": (192, 192, 2, 2),
        "down_samples.0.resnet_attn_blocks.2.2.shortcut_down_sample.weight": (384, 384, 2, 2),
        "up_samples.1.resnet_attn_blocks.0.0.resnet_blocks.1.up_sample.weight": (1536, 1536, 2, 2),
        "up_samples.1.resnet_attn_blocks.0.0.shortcut_up_sample.weight": (3072, 3072, 2, 2),
        "down_samples.1.resnet_attn_blocks.0.1.attention.to_key.weight": (768, 4096),
        "down_samples.1.resnet_attn_blocks.0.1.feed_forward.0.weight": (3072, 768, 1, 1),
        "up_samples.0.self_attention_block.attention.to_query.weight": (1536, 1536),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert sum("down_sample.weight" in k and "shortcut" not in k for k in state) == 3
    assert sum("shortcut_projection.weight" in k for k in state) == 11


def test_key_mapping_agrees_with_diffusers_converter_and_round_trips():
    reference, ours, _ = make_pair("four_levels")
    original = ours.state_dict()
    projection = {"0.weight": torch.zeros(1), "1.weight": torch.zeros(1), "1.bias": torch.zeros(1)}
    ours_to_diffusers = original_to_diffusers_unet(original, projection)
    oracle = convert_state_dict(original)  # diffusers' own renaming of original keys
    assert set(oracle) | set(
        ["encoder_hid_proj.projection_linear.weight", "encoder_hid_proj.projection_norm.weight",
         "encoder_hid_proj.projection_norm.bias"]
    ) == set(ours_to_diffusers)
    assert set(ours_to_diffusers) == set(reference.state_dict())
    back, back_projection = diffusers_to_original_unet(ours_to_diffusers)
    assert back.keys() == original.keys() and back_projection.keys() == projection.keys()
    assert all(back[k] is original[k] for k in original)


def test_single_block_levels_build_a_working_network():
    cfg = UNetConfig(
        model_channels=16, init_channels=8, time_embed_dim=32, context_dim=16, groups=4, head_dim=8,
        dim_mult=(1, 2, 2, 4), num_blocks=1,
    )
    unet = UNet(cfg)
    x = torch.randn(2, 4, 16, 16)
    out = unet(x, torch.tensor([3, 900]), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == x.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(groups=32, model_channels=32, init_channels=16), "groups=32 does not divide"),
        (dict(model_channels=32, init_channels=16, groups=8, head_dim=64, time_embed_dim=128), "head_dim=64"),
        (dict(num_blocks=(3, 3)), "num_blocks has 2 entries"),
        (dict(num_blocks=0), "num_blocks must hold ints >= 1"),
        (dict(dim_mult=()), "at least one level"),
        (dict(model_channels=0), "model_channels must be a positive int"),
    ],
)
def test_config_rejects_unbuildable_networks_with_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_config_round_trips_through_dict_and_rejects_unknown_keys():
    cfg = UNetConfig(model_channels=32, init_channels=16, groups=8, head_dim=16, time_embed_dim=64)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_forward_rejects_bad_inputs_early():
    _, ours, _ = make_pair("fast_test")
    ctx, mask = torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(torch.randn(1, 4, 9, 9), 5, ctx, mask)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        ours(torch.randn(1, 3, 8, 8), 5, ctx, mask)
    with pytest.raises(ValueError, match="context must be"):
        ours(torch.randn(1, 4, 8, 8), 5, torch.randn(1, 3, 7), mask)
    with pytest.raises(ValueError, match="context_mask must be"):
        ours(torch.randn(1, 4, 8, 8), 5, ctx, mask[:, :2])
    with pytest.raises(ValueError, match="time must be"):
        ours(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), ctx.expand(2, -1, -1), mask.expand(2, -1))


def count_norm_projections(unet):
    """A list that grows by one at every call of a conditional norm's projection Linear; and the hooks to remove."""
    calls = []
    hooks = [module.context_mlp[1].register_forward_hook(lambda *_: calls.append(1))
             for module in unet.modules() if hasattr(module, "context_mlp")]
    return calls, hooks


@pytest.mark.parametrize("name", ["four_levels", "three_levels"])
def test_bound_unet_matches_diffusers_at_every_timestep_of_its_table(name):
    """A binding built once for a timestep list gives diffusers' ε at each of them (the per-call path's tolerance)."""
    reference, ours, projection = make_pair(name)
    cfg = DIFFUSERS_CONFIGS[name]
    x, _, raw, mask = random_inputs(3, 4, 4 * ours.config.downsample_factor, cfg["encoder_hid_dim"])
    timesteps = [999, 600, 250, 3]
    with torch.no_grad():
        context = projection(raw)
        bound = ours.bind(context, mask, timesteps)
        for t in timesteps:
            time = torch.full((3,), t)
            expected = reference(x, time, encoder_hidden_states=raw, encoder_attention_mask=mask.float()).sample
            assert (bound(x, time) - expected).abs().max() <= 1e-5
    assert ours.modulation_width == sum(n.context_mlp[1].out_features for n in ours.modules()
                                        if hasattr(n, "context_mlp"))
    assert bound.table is not None and bound.table.outputs[0].shape == (4, 3, bound.table.outputs[0].shape[-1])


def test_bound_unet_is_exact_in_fp64_and_falls_back_to_forward_off_its_table():
    """In fp64 the table path equals the per-call forward (< 1e-12) without running a single norm projection; at a
    timestep not in the table, or a batch of mixed timesteps, the binding computes them as forward does."""
    _, ours, projection = make_pair("three_levels")
    ours, projection = ours.double(), projection.double()
    x, _, raw, mask = random_inputs(2, 4, 16, DIFFUSERS_CONFIGS["three_levels"]["encoder_hid_dim"])
    x, raw = x.double(), raw.double()
    norms = sum(hasattr(m, "context_mlp") for m in ours.modules())
    with torch.no_grad():
        context = projection(raw)
        bound = ours.bind(context, mask, [800, 40])
        calls, hooks = count_norm_projections(ours)
        try:
            for time in (torch.tensor([40, 40]), 40):
                calls.clear()
                got = bound(x, time)
                assert not calls  # every norm read its table row
                assert (got - ours(x, time, context, mask)).abs().max() < 1e-12
            for time in (torch.tensor([41, 41]), torch.tensor([800, 40])):
                calls.clear()
                assert torch.equal(bound(x, time), ours(x, time, context, mask))
                assert len(calls) == 2 * norms  # computed per call, by the binding and by forward
        finally:
            for hook in hooks:
                hook.remove()


def test_bind_refuses_repeated_timesteps_and_latents_of_another_batch():
    _, ours, projection = make_pair("three_levels")
    x, _, raw, mask = random_inputs(2, 4, 16, DIFFUSERS_CONFIGS["three_levels"]["encoder_hid_dim"])
    with torch.no_grad():
        context = projection(raw)
        with pytest.raises(ValueError, match="distinct"):
            ours.bind(context, mask, [800, 800])
        bound = ours.bind(context, mask, [800, 40])
        with pytest.raises(ValueError, match="latents of batch 1 for a text context of batch 2"):
            bound(x[:1], torch.tensor([40]))
        with pytest.raises(ValueError, match="context_mask must be"):
            ours.bind(context, mask[:, :2], [40])


def test_bind_builds_no_table_beyond_its_byte_limit():
    """The table holds S·B·modulation_width values; over ``max_table_bytes`` every call computes the norms' inputs."""
    _, ours, projection = make_pair("fast_test")
    x, _, raw, mask = random_inputs(2, 4, 8, DIFFUSERS_CONFIGS["fast_test"]["encoder_hid_dim"])
    with torch.no_grad():
        context = projection(raw)
        size = 2 * 2 * ours.modulation_width * 4  # two timesteps, batch 2, fp32
        assert ours.bind(context, mask, [500, 20], max_table_bytes=size).table is not None
        over = ours.bind(context, mask, [500, 20], max_table_bytes=size - 1)
        assert over.table is None and ours.bind(context, mask).table is None
        assert torch.equal(over(x, torch.tensor([20, 20])), ours(x, torch.tensor([20, 20]), context, mask))


class StandInNetwork(torch.nn.Module):
    """A network without ``bind``: ε = x·weight; records the text of every call."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.texts = []

    def forward(self, x, t, context, mask):
        self.texts.append((context, mask))
        return x * self.weight


def test_pipeline_binder_binds_a_unet_once_and_gives_other_networks_the_text_at_every_call():
    """The pipelines' binder: our U-Net precomputes the norms' inputs at bind time (none per call) and ε comes back
    in the latents' dtype; a stand-in ``(x, t, context, mask) -> ε`` network gets the bound text at every call."""
    from kandinsky3.pipelines.stages import network_binder

    _, ours, projection = make_pair("fast_test")
    x, _, raw, mask = random_inputs(2, 4, 8, DIFFUSERS_CONFIGS["fast_test"]["encoder_hid_dim"])
    t = torch.tensor([40, 40])
    with torch.no_grad():
        context = projection(raw)
        calls, hooks = count_norm_projections(ours)
        try:
            network = network_binder(ours, [800, 40])(context, mask)
            at_bind = len(calls)
            eps = network(x.double(), t)
            assert at_bind == sum(hasattr(m, "context_mlp") for m in ours.modules()) and len(calls) == at_bind
        finally:
            for hook in hooks:
                hook.remove()
        assert eps.dtype == torch.float64
        assert (eps.float() - ours(x, t, context, mask)).abs().max() <= 1e-5
        stand_in = StandInNetwork()
        network = network_binder(stand_in, [800, 40])(context, mask)
        assert torch.equal(network(x, t), x) and torch.equal(network(x, t), x)
    assert len(stand_in.texts) == 2
    assert all(torch.equal(c, context) and torch.equal(m, mask) for c, m in stand_in.texts)
