"""Config inference from original-layout shapes (kandinsky3.weights.infer).

A round trip builds a network from a config on the meta device, infers a config from its state-dict shapes alone and
checks that the inferred config builds a network with exactly the same keys and shapes (and, where the original
config is already in canonical form, that the configs are equal).
"""

from __future__ import annotations

import pytest
import torch

from kandinsky3.models.movq import MoVQ, MoVQConfig
from kandinsky3.models.unet import UNet, UNetConfig
from kandinsky3.weights import CheckpointError, infer_movq_config, infer_unet_config


def _shapes(module_class, config):
    with torch.device("meta"):
        model = module_class(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


UNET_CONFIGS = {
    "released": UNetConfig.kandinsky3(),
    "inpainting": UNetConfig.kandinsky3_inpainting(),
    # diffusers' fast-test network: 2 levels, down attention (F, T), up attention (T, T) (docs/practice.md §10.2)
    "diffusers_fast_test": UNetConfig.from_diffusers(dict(
        in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=3,
        block_out_channels=(32, 64), cross_attention_dim=4, encoder_hid_dim=32,
    )),
    "three_levels": UNetConfig.from_diffusers(dict(
        in_channels=4, time_embedding_dim=64, groups=8, attention_head_dim=16, layers_per_block=2,
        block_out_channels=(32, 64, 128), cross_attention_dim=32, encoder_hid_dim=16,
    )),
    "other_ratios_and_blocks": UNetConfig(
        model_channels=24, init_channels=12, num_channels=9, out_channels=3, time_embed_dim=24, context_dim=20,
        groups=4, head_dim=6, expansion_ratio=2, compression_ratio=3, dim_mult=(1, 2, 2),
        num_blocks=(1, 2, 3), add_cross_attention=(True, False, True), add_self_attention=(False, False, True),
    ),
    "asymmetric_blocks": UNetConfig(
        model_channels=16, init_channels=8, time_embed_dim=16, context_dim=8, groups=4, head_dim=4,
        dim_mult=(1, 2), num_blocks=(2, 3, 1, 2), add_cross_attention=(False, True), add_self_attention=(True, False),
    ),
}


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_config_inferred_from_shapes_rebuilds_the_same_network(name):
    config = UNET_CONFIGS[name]
    shapes = _shapes(UNet, config)
    inferred = infer_unet_config(shapes, head_dim=config.head_dim, groups=config.groups)
    assert _shapes(UNet, inferred) == shapes
    for field in ("model_channels", "init_channels", "num_channels", "out_channels", "time_embed_dim",
                  "context_dim", "expansion_ratio", "compression_ratio"):
        assert getattr(inferred, field) == getattr(config, field), field


def test_released_unet_config_is_recovered_exactly_with_default_head_dim_and_groups():
    assert infer_unet_config(_shapes(UNet, UNetConfig.kandinsky3())) == UNetConfig.kandinsky3()


def test_two_level_diffusers_flags_become_down_plus_reversed_up():
    config = UNET_CONFIGS["diffusers_fast_test"]
    inferred = infer_unet_config(_shapes(UNet, config), head_dim=4, groups=2)
    assert inferred.add_self_attention == (False, True, True, True)  # down (F, T) + reversed up (T, T)
    assert inferred.add_cross_attention == (False, True, True, True)
    assert inferred.num_blocks == (3, 3)  # symmetric: n entries
    n = inferred.levels
    assert inferred.add_self_attention[:n] == (False, True) and inferred.add_self_attention[::-1][:n] == (True, True)


def test_symmetric_flags_give_one_entry_per_level():
    config = UNetConfig(model_channels=16, init_channels=8, time_embed_dim=16, context_dim=8, groups=4, head_dim=4,
                        dim_mult=(1, 2), num_blocks=(2, 2), add_cross_attention=(False, True),
                        add_self_attention=(True, True))
    inferred = infer_unet_config(_shapes(UNet, config), head_dim=4, groups=4)
    assert inferred.add_cross_attention == (False, True) and inferred.add_self_attention == (True, True)


def test_head_dim_or_groups_not_dividing_the_widths_asks_for_them():
    shapes = _shapes(UNet, UNET_CONFIGS["diffusers_fast_test"])
    with pytest.raises(CheckpointError, match="pass head_dim=/groups="):
        infer_unet_config(shapes)  # defaults 64 / 32 do not divide the 16-wide init channels


def test_unet_inference_names_a_missing_anchor_key():
    shapes = _shapes(UNet, UNET_CONFIGS["diffusers_fast_test"])
    del shapes["in_layer.weight"]
    with pytest.raises(CheckpointError, match="in_layer.weight"):
        infer_unet_config(shapes, head_dim=4, groups=2)


MOVQ_CONFIGS = {
    "released": MoVQConfig.kandinsky3(),
    "tiny": MoVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), z_channels=4),
    "deep": MoVQConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2, attn_resolutions=(128, 32), z_channels=3,
                       in_channels=1, out_ch=2),
    "codebook": MoVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), codebook_size=12),
    "groups_8": MoVQConfig(ch=16, ch_mult=(1, 3), num_res_blocks=1, attn_resolutions=(256,), norm_groups=8),
}


@pytest.mark.parametrize("name", sorted(MOVQ_CONFIGS))
def test_movq_config_is_recovered_from_shapes(name):
    config = MOVQ_CONFIGS[name]
    inferred = infer_movq_config(_shapes(MoVQ, config), norm_groups=config.norm_groups)
    assert inferred == config


def test_movq_attention_levels_use_the_resolution_256_convention():
    config = MoVQConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=64)
    inferred = infer_movq_config(_shapes(MoVQ, config))
    assert inferred.attn_resolutions == (64,) and inferred.resolution == 256  # level 2 in both
    assert _shapes(MoVQ, inferred) == _shapes(MoVQ, config)


def test_movq_norm_groups_not_dividing_the_widths_asks_for_them():
    with pytest.raises(CheckpointError, match="pass norm_groups="):
        infer_movq_config(_shapes(MoVQ, MOVQ_CONFIGS["groups_8"]))
