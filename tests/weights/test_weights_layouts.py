"""Loading every checkpoint layout through the auto-detecting API, compared with the networks written.

Original and native checkpoints hold exactly the tensors of the reference networks, so outputs must agree to
1e-6 in fp32 (the ``assert_*_matches`` helpers of _checkpoints; bit-identical in practice). diffusers checkpoints
are compared twice: exactly, against the reference converted with the key modules, and against diffusers' own
forward passes at 1e-5 (the same float32 operations in a different order; see tests/test_unet.py, test_movq.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _checkpoints import (
    PROMPTS,
    TINY_UNET,
    assert_movq_matches,
    assert_text_matches,
    assert_unet_matches,
    max_diff,
    unet_inputs,
    write_diffusers,
    write_native,
    write_original,
)

from kandinsky3.weights import (
    CheckpointError,
    load_components,
    load_movq,
    load_text_encoder,
    load_unet,
)
from kandinsky3.weights.movq_keys import diffusers_to_original_movq
from kandinsky3.weights.unet_keys import diffusers_to_original_unet

HINTS = dict(head_dim=4, groups=4)
DIFFUSERS_PARITY = 1e-5  # same math in diffusers' kernel order


@pytest.fixture(scope="module")
def original31(tmp_path_factory):
    return write_original(tmp_path_factory.mktemp("k31"), "3.1", ("base", "flash", "inpainting"))


@pytest.fixture(scope="module")
def original30(tmp_path_factory):
    return write_original(tmp_path_factory.mktemp("k30"), "3.0", ("base", "inpainting"), seed=5)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return write_diffusers(tmp_path_factory.mktemp("diffusers"))


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return write_native(tmp_path_factory.mktemp("native") / "model", seed=7)


# ------------------------------------------------------------------------------------------------ original 3.1


@pytest.mark.parametrize("variant", ["base", "flash", "inpainting"])
def test_original_31_variants_load_with_their_own_unet_projection_and_null_embedding(original31, variant):
    loaded = load_components(original31.root, variant=variant, **HINTS)
    assert (loaded.layout, loaded.generation, loaded.conditioning, loaded.variant) == (
        "original", "3.1", "original", variant)
    assert loaded.scheduler_config is None
    assert loaded.unet.config.num_channels == (9 if variant == "inpainting" else 4)
    assert_unet_matches(loaded.unet, original31.unets[variant])
    assert_text_matches(loaded.text_encoder, original31.texts[variant])
    assert_movq_matches(loaded.movq, original31.movq)


def test_original_unet_loads_in_the_requested_dtype_without_changing_values(original31):
    unet = load_unet(original31.root, variant="flash", dtype="bf16", **HINTS)
    reference = original31.unets["flash"].state_dict()
    state = unet.state_dict()
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert all(torch.equal(state[key], reference[key].to(torch.bfloat16)) for key in reference)


def test_single_files_of_the_original_layout_load_alone(original31):
    weights = original31.root / "weights"
    assert_unet_matches(load_unet(weights / "kandinsky3_inpainting.pt", **HINTS), original31.unets["inpainting"])
    assert_movq_matches(load_movq(weights / "movq.pt"), original31.movq)


def test_unknown_or_absent_variant_is_an_error(original30, original31):
    with pytest.raises(ValueError, match="variant must be one of"):
        load_unet(original31.root, variant="turbo", **HINTS)
    with pytest.raises(CheckpointError, match="kandinsky3_flash.pt"):
        load_unet(original30.root, variant="flash", **HINTS)


def test_text_encoder_alone_and_missing_projection_file(original31, tmp_path):
    assert_text_matches(load_text_encoder(original31.root, variant="flash"), original31.texts["flash"])
    copy = tmp_path / "copy"
    shutil.copytree(original31.root, copy)
    (copy / "weights" / "flan_ul2_encoder" / "projection_flash.pt").unlink()
    with pytest.raises(FileNotFoundError, match="projection_flash.pt"):
        load_text_encoder(copy, variant="flash")


# ------------------------------------------------------------------------------------------------ original 3.0


def test_original_30_reads_projection_from_the_unet_file_and_t5_from_a_full_checkpoint(original30):
    loaded = load_components(original30.root, variant="inpainting", t5_path=original30.t5_path, **HINTS)
    assert (loaded.generation, loaded.conditioning) == ("3.0", "original")
    assert_unet_matches(loaded.unet, original30.unets["inpainting"])
    assert_text_matches(loaded.text_encoder, original30.texts["inpainting"])
    assert_movq_matches(loaded.movq, original30.movq)


# ------------------------------------------------------------------------------------------------ diffusers


def _reference_projection(unet):
    projection = torch.nn.Sequential(torch.nn.Linear(32, 12, bias=False), torch.nn.LayerNorm(12))
    projection.load_state_dict(diffusers_to_original_unet(unet.state_dict())[1])
    return projection


def test_diffusers_folder_loads_the_same_tensors_as_the_key_modules(diffusers_folder):
    loaded = load_components(diffusers_folder.root)
    assert (loaded.layout, loaded.conditioning, loaded.generation) == ("diffusers", "diffusers", None)
    assert loaded.scheduler_config["_class_name"] == "DDPMScheduler"
    unet_state, projection = diffusers_to_original_unet(diffusers_folder.diffusers_unet.state_dict())
    state = loaded.unet.state_dict()
    assert state.keys() == unet_state.keys() and all(torch.equal(state[k], unet_state[k]) for k in state)
    movq_state = diffusers_to_original_movq(diffusers_folder.diffusers_movq.state_dict(), loaded.movq.config)
    assert all(torch.equal(loaded.movq.state_dict()[k], v) for k, v in movq_state.items())
    encoder = loaded.text_encoder
    assert all(torch.equal(encoder.projection.state_dict()[k], v) for k, v in projection.items())
    assert torch.equal(encoder.null_embedding, torch.zeros(12))  # diffusers has no null embedding


@torch.no_grad()
def test_diffusers_folder_matches_diffusers_forward_passes(diffusers_folder):
    loaded = load_components(diffusers_folder.root)
    reference = diffusers_folder.diffusers_unet
    x, t, _, mask = unet_inputs(TINY_UNET)
    raw = torch.randn(x.shape[0], mask.shape[1], 32, generator=torch.Generator().manual_seed(4))
    expected = reference(x, t, encoder_hidden_states=raw, encoder_attention_mask=mask.float()).sample
    got = loaded.unet(x, t, loaded.text_encoder.projection(raw), mask)
    assert max_diff(got, expected) <= DIFFUSERS_PARITY
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    vq = diffusers_folder.diffusers_movq
    latents = vq.encode(images).latents
    assert max_diff(loaded.movq.encode(images), latents) <= DIFFUSERS_PARITY
    assert max_diff(loaded.movq.decode(latents), vq.decode(latents, force_not_quantize=True).sample) <= DIFFUSERS_PARITY
    t5 = diffusers_folder.texts["base"].t5
    ids, attention = loaded.text_encoder.tokenize(PROMPTS)
    assert max_diff(loaded.text_encoder.t5(input_ids=ids, attention_mask=attention)[0],
                    t5(input_ids=ids, attention_mask=attention)[0]) <= 1e-6


def test_diffusers_fp16_variant_files_load_as_fp16_or_in_a_requested_dtype(tmp_path):
    written = write_diffusers(tmp_path / "fp16", fp16_variant=True)
    assert (written.root / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = load_components(written.root)
    assert loaded.unet.in_layer.weight.dtype == torch.float16 and loaded.movq.quant_conv.weight.dtype == torch.float16
    unet = load_unet(written.root, dtype="fp32")
    assert unet.in_layer.weight.dtype == torch.float32
    assert torch.equal(unet.in_layer.weight, written.diffusers_unet.conv_in.weight)  # fp16 values, widened


def test_diffusers_component_folders_and_files_load_alone(diffusers_folder):
    root = diffusers_folder.root
    unet_state = diffusers_to_original_unet(diffusers_folder.diffusers_unet.state_dict())[0]
    assert torch.equal(load_unet(root / "unet").state_dict()["in_layer.weight"], unet_state["in_layer.weight"])
    movq = load_movq(root / "movq" / "diffusion_pytorch_model.safetensors")
    assert movq.config.attn_resolutions == (128,) and movq.config.widths == (32, 64)


def test_diffusers_variant_other_than_base_is_refused(diffusers_folder):
    with pytest.raises(CheckpointError, match="only the base model"):
        load_components(diffusers_folder.root, variant="flash")


# ------------------------------------------------------------------------------------------------ native


def test_native_folder_round_trips_every_component(native):
    loaded = load_components(native.root)
    assert (loaded.layout, loaded.conditioning, loaded.variant) == ("native", "original", "base")
    assert loaded.unet.config == native.unets["base"].config and loaded.movq.config == native.movq.config
    assert_unet_matches(loaded.unet, native.unets["base"])
    assert_movq_matches(loaded.movq, native.movq)
    assert_text_matches(loaded.text_encoder, native.texts["base"])


def test_native_component_folder_and_file_load_alone(native):
    assert_unet_matches(load_unet(native.root / "unet"), native.unets["base"])
    assert_movq_matches(load_movq(native.root / "movq" / "model.safetensors"), native.movq)


def test_native_config_with_unknown_key_is_rejected(native, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(native.root / "unet", copy)
    config = json.loads((copy / "config.json").read_text())
    config["attention_type"] = "flash"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown keys \['attention_type'\]") as info:
        load_unet(copy)
    assert "config.json" in str(info.value)


def test_native_manifest_is_validated_and_variant_checked(native, tmp_path):
    with pytest.raises(CheckpointError, match="holds the 'base' variant"):
        load_unet(native.root, variant="flash")
    copy = tmp_path / "copy"
    shutil.copytree(native.root, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    manifest = json.loads((copy / "kandinsky3.json").read_text())
    del manifest["conditioning"]
    (copy / "kandinsky3.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"missing keys \['conditioning'\]"):
        load_components(copy)


def test_native_with_diffusers_conditioning_has_no_null_embedding(tmp_path):
    written = write_native(tmp_path / "diffusers_style", conditioning="diffusers")
    loaded = load_components(written.root, components=("text_encoder",))
    assert loaded.conditioning == "diffusers" and loaded.unet is None and loaded.movq is None
    assert torch.equal(loaded.text_encoder.null_embedding, torch.zeros(12))
