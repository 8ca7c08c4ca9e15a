"""LoRA adapters (kandinsky3.lora): which layers they wrap, the file, loading checks, scales, fuse / unfuse.

Components are the tiny random ones (tests/_tiny_models.py); adapters get random non-zero weights (peft starts B
at 0, which would hide every mistake). Equalities that hold by construction are exact; outputs compared after a
save / load or a fuse are compared at 1e-5, the float32 rounding of a reordered sum of a few hundred terms.
"""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import tiny_components
from safetensors.torch import load_file, save_file

from kandinsky3 import lora
from kandinsky3.lowmem.storage import compute_in
from kandinsky3.models.unet import Attention, ResNetBlock, UNet, UNetConfig
from kandinsky3.pipelines.text_to_image import Kandinsky3Pipeline
from kandinsky3.weights import CheckpointError

pytest.importorskip("peft")

ALL_TARGETS = lora.LoraSpec(rank=4, alpha=8.0, targets=("attention", "resnet", "text_projection"))


def _randomize_adapter(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _trained(spec: lora.LoraSpec = ALL_TARGETS, seed: int = 0, name: str = "a"):
    """Tiny (unet, movq, text_encoder) with a random adapter ``name`` injected."""
    unet, movq, text_encoder = tiny_components(seed=0)
    params = lora.inject_lora(unet, text_encoder, spec, name, trainable=True)
    _randomize_adapter(params, seed)
    return unet, movq, text_encoder


def _eps(unet: UNet, text_encoder) -> torch.Tensor:
    """One U-Net call on fixed inputs, through the (possibly adapted) text projection."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        context, mask = text_encoder.encode(["a red circle", "a blue square on the left"])
        return unet(x, torch.tensor([10, 500]), context, mask)


def test_default_target_wraps_every_attention_projection_and_nothing_else():
    unet, _, text_encoder = tiny_components()
    lora.inject_lora(unet, text_encoder, lora.LoraSpec(rank=2), "a")
    wrapped = {path for path, _ in lora._lora_layers(unet)}
    attentions = [path for path, module in unet.named_modules() if isinstance(module, Attention)]
    assert wrapped == {f"{a}.{p}" for a in attentions for p in ("to_query", "to_key", "to_value", "output_layer")}
    assert not list(lora._lora_layers(text_encoder))
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert trainable == []  # inference adapters are frozen, and so is the base


def test_resnet_target_wraps_the_residual_block_convolutions():
    unet, _, text_encoder = tiny_components()
    lora.inject_lora(unet, text_encoder, lora.LoraSpec(rank=2, targets=("resnet",)), "a")
    wrapped = {path for path, _ in lora._lora_layers(unet)}
    blocks = [path for path, module in unet.named_modules() if isinstance(module, ResNetBlock)]
    assert wrapped == {f"{b}.resnet_blocks.{i}.projection" for b in blocks for i in range(4)}


def test_full_size_unet_on_meta_device_takes_the_default_lora():
    """The released 3B U-Net, built without memory: rank 16 on the attention projections is 6,684,672 parameters,
    r·(in + out) for each of the 100 projections of its 25 attention modules (0.22 % of 3.04B)."""
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    params = lora.inject_lora(unet, None, lora.LoraSpec(rank=16), "a", trainable=True)
    layers = list(lora._lora_layers(unet))
    expected = sum(16 * (layer.in_features + layer.out_features) for _, layer in layers)
    assert len(layers) == 4 * sum(isinstance(m, Attention) for m in unet.modules()) == 100
    assert sum(p.numel() for p in params) == expected == 6_684_672
    assert all(p.is_meta and p.requires_grad for p in params)


def test_save_then_load_gives_the_same_outputs(tmp_path):
    unet, _, text_encoder = _trained()
    expected = _eps(unet, text_encoder)
    path = lora.save_lora(tmp_path / "a.safetensors", unet, text_encoder, "a", spec=ALL_TARGETS,
                          base=lora.base_identity(unet, "tiny-random"), trigger_words=("sks",))
    fresh_unet, _, fresh_text = tiny_components(seed=0)
    name = lora.load_lora(fresh_unet, fresh_text, path)
    assert name == "a"
    torch.testing.assert_close(_eps(fresh_unet, fresh_text), expected, rtol=0, atol=1e-5)
    read = lora.read_lora(path)
    assert read.trigger_words == ("sks",) and read.spec == ALL_TARGETS and read.base.name == "tiny-random"
    header = lora.read_lora(path, tensors=False)  # what a server listing a folder reads
    assert header.tensors == {} and read.tensors and header.metadata == read.metadata and header.base == read.base


def test_file_keys_are_stable_module_paths(tmp_path):
    unet, _, text_encoder = _trained(name="some-name")
    path = lora.save_lora(tmp_path / "x.safetensors", unet, text_encoder, "some-name", spec=ALL_TARGETS,
                          base=lora.base_identity(unet))
    keys = set(load_file(str(path)))
    assert "unet.feature_pooling.attention.to_query.lora_A.weight" in keys
    assert "text_encoder.projection.0.lora_B.weight" in keys
    assert not any("some-name" in key or "base_layer" in key for key in keys)


def test_load_refuses_a_lora_of_another_base_naming_both(tmp_path):
    unet, _, text_encoder = _trained()
    path = lora.save_lora(tmp_path / "a.safetensors", unet, text_encoder, "a", spec=ALL_TARGETS,
                          base=lora.base_identity(unet, "model-one"))
    other_unet, _, other_text = tiny_components(seed=5)  # same architecture, other weights
    with pytest.raises(CheckpointError, match=r"model-one.*another model: a U-Net \(config"):
        lora.load_lora(other_unet, other_text, path)
    assert not list(lora._lora_layers(other_unet))


def test_load_refuses_unknown_keys(tmp_path):
    unet, _, text_encoder = _trained()
    path = lora.save_lora(tmp_path / "a.safetensors", unet, text_encoder, "a", spec=ALL_TARGETS,
                          base=lora.base_identity(unet))
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors["unet.in_layer.lora_A.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(path), metadata=metadata)
    fresh_unet, _, fresh_text = tiny_components(seed=0)
    with pytest.raises(CheckpointError, match="unknown keys .*unet.in_layer.lora_A.weight"):
        lora.load_lora(fresh_unet, fresh_text, path)
    assert lora.lora_scales(fresh_unet, fresh_text) == {}  # the half-loaded adapter is gone again


def test_load_refuses_a_file_without_lora_metadata(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    unet, _, text_encoder = tiny_components()
    with pytest.raises(CheckpointError, match="not a Kandinsky 3 LoRA file"):
        lora.load_lora(unet, text_encoder, tmp_path / "plain.safetensors")


def test_fuse_then_unfuse_restores_the_original_weights_exactly():
    unet, _, text_encoder = _trained()
    before = {k: v.clone() for k, v in {**unet.state_dict(), **text_encoder.state_dict()}.items()}
    adapted = _eps(unet, text_encoder)
    lora.fuse_lora(unet, text_encoder)
    fused = _eps(unet, text_encoder)
    changed = unet.down_samples[1].self_attention_block.attention.to_query.base_layer.weight
    assert not torch.equal(changed, before["down_samples.1.self_attention_block.attention.to_query.base_layer.weight"])
    lora.unfuse_lora(unet, text_encoder)
    after = {**unet.state_dict(), **text_encoder.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(fused, adapted, rtol=0, atol=1e-5)
    assert torch.equal(_eps(unet, text_encoder), adapted)


def test_fuse_works_on_weights_stored_in_bf16_computed_in_fp32():
    unet, _, text_encoder = _trained(lora.LoraSpec(rank=4))
    unet.to(torch.bfloat16)
    compute_in(unet, torch.float32)
    stored = {k: v.clone() for k, v in unet.state_dict().items()}
    adapted = _eps(unet, text_encoder)
    lora.fuse_lora(unet, text_encoder)
    # fused: the delta is rounded into bf16 weights, so the output moves by about bf16's precision
    torch.testing.assert_close(_eps(unet, text_encoder), adapted, rtol=0, atol=2e-2)
    lora.unfuse_lora(unet, text_encoder)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in stored.items())


def test_while_fused_only_unfusing_is_allowed():
    unet, _, text_encoder = _trained()
    lora.fuse_lora(unet, text_encoder)
    for action in (lambda: lora.set_lora_scale(unet, text_encoder, "a", 0.5),
                   lambda: lora.unload_lora(unet, text_encoder),
                   lambda: lora.fuse_lora(unet, text_encoder)):
        with pytest.raises(ValueError, match="fused"):
            action()


def test_scale_zero_gives_the_base_output_exactly():
    unet, _, text_encoder = tiny_components()
    base = _eps(unet, text_encoder)
    _randomize_adapter(lora.inject_lora(unet, text_encoder, ALL_TARGETS, "a", trainable=True), 0)
    assert not torch.equal(_eps(unet, text_encoder), base)
    lora.set_lora_scale(unet, text_encoder, "a", 0.0)
    assert torch.equal(_eps(unet, text_encoder), base)


def test_two_adapters_each_follow_their_own_scale():
    unet, _, text_encoder = _trained(lora.LoraSpec(rank=4), name="a")
    only_a = _eps(unet, text_encoder)
    _randomize_adapter(lora.inject_lora(unet, text_encoder, lora.LoraSpec(rank=2), "b", trainable=True), 1)
    assert lora.lora_scales(unet, text_encoder) == {"a": 1.0, "b": 1.0}
    both = _eps(unet, text_encoder)
    assert not torch.equal(both, only_a)
    lora.set_lora_scale(unet, text_encoder, "b", 0.0)
    assert torch.equal(_eps(unet, text_encoder), only_a)
    lora.set_lora_scale(unet, text_encoder, "b", 1.0)
    lora.unload_lora(unet, text_encoder, "a")
    lora.set_lora_scale(unet, text_encoder, "b", 0.0)
    unet_plain, _, text_plain = tiny_components()
    assert torch.equal(_eps(unet, text_encoder), _eps(unet_plain, text_plain))


def test_unload_all_restores_the_plain_modules():
    unet, _, text_encoder = tiny_components()
    keys = set(unet.state_dict()) | set(text_encoder.state_dict())
    lora.inject_lora(unet, text_encoder, ALL_TARGETS, "a")
    lora.inject_lora(unet, text_encoder, lora.LoraSpec(rank=2), "b")
    lora.unload_lora(unet, text_encoder)
    assert set(unet.state_dict()) | set(text_encoder.state_dict()) == keys
    assert type(unet.feature_pooling.attention.to_query) is torch.nn.Linear
    assert not hasattr(unet, "peft_config")


def test_pipeline_methods_load_scale_fuse_and_unload(tmp_path):
    unet, movq, text_encoder = _trained(lora.LoraSpec(rank=4))
    path = lora.save_lora(tmp_path / "style.safetensors", unet, text_encoder, "a", spec=lora.LoraSpec(rank=4),
                          base=lora.base_identity(unet))
    plain_unet, movq, plain_text = tiny_components()
    pipe = Kandinsky3Pipeline(plain_unet, movq, plain_text)
    call = dict(width=16, height=16, steps=2, seed=0, output_type="pt", progress=False)
    base = pipe("a red circle", **call)
    assert pipe.load_lora(path, scale=0.5) == "style"
    half = pipe("a red circle", **call)
    assert not torch.equal(half, base)
    pipe.fuse_lora()
    torch.testing.assert_close(pipe("a red circle", **call), half, rtol=0, atol=1e-4)
    pipe.unfuse_lora()
    pipe.set_lora_scale("style", 0.0)
    assert torch.equal(pipe("a red circle", **call), base)
    pipe.unload_lora()
    assert lora.lora_scales(pipe.unet, pipe.text_encoder) == {}


def test_pipeline_refuses_lora_when_the_unet_is_read_from_disk_per_call(tmp_path):
    unet, movq, text_encoder = tiny_components()
    pipe = Kandinsky3Pipeline(unet, movq, text_encoder, reload={"unet": lambda: unet})
    with pytest.raises(ValueError, match="offload='disk'"):
        pipe.load_lora(tmp_path / "any.safetensors")


def test_names_are_checked():
    unet, _, text_encoder = tiny_components()
    lora.inject_lora(unet, text_encoder, lora.LoraSpec(rank=2), "a")
    with pytest.raises(ValueError, match="already loaded"):
        lora.inject_lora(unet, text_encoder, lora.LoraSpec(rank=2), "a")
    with pytest.raises(ValueError, match="letters, digits"):
        lora.inject_lora(unet, text_encoder, lora.LoraSpec(rank=2), "a.b")
    with pytest.raises(ValueError, match="no LoRA named 'c'"):
        lora.set_lora_scale(unet, text_encoder, "c", 1.0)


def test_spec_rejects_unknown_targets_and_bad_numbers():
    with pytest.raises(ValueError, match="unknown LoRA targets \\['mlp'\\]"):
        lora.LoraSpec(targets=("mlp",))
    with pytest.raises(ValueError, match="rank >= 1"):
        lora.LoraSpec(rank=0)


def test_base_identity_ignores_the_storage_dtype_but_not_the_weights():
    unet, _, _ = tiny_components(seed=0)
    identity = lora.base_identity(unet)
    assert lora.base_identity(unet.to(torch.bfloat16)).matches(identity)
    assert not lora.base_identity(tiny_components(seed=1)[0]).matches(identity)


def test_metadata_records_rank_alpha_targets_and_trigger_words(tmp_path):
    unet, _, text_encoder = _trained()
    path = lora.save_lora(tmp_path / "a.safetensors", unet, text_encoder, "a", spec=ALL_TARGETS,
                          base=lora.base_identity(unet, "tiny"), trigger_words=("sks", "cyan"))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "kandinsky3-lora" and metadata["rank"] == "4" and float(metadata["alpha"]) == 8.0
    assert json.loads(metadata["targets"]) == ["attention", "resnet", "text_projection"]
    assert json.loads(metadata["trigger_words"]) == ["sks", "cyan"] and metadata["base_model"] == "tiny"


@pytest.mark.parametrize("prompt, name, scale, expected", [
    ("a red circle", "cyan", 1.0, "a red circle <lora:cyan:1>"),
    ("a red circle  ", "cyan", 0.25, "a red circle <lora:cyan:0.25>"),
    ("", "cyan", 1.0, "<lora:cyan:1>"),
    ("a <lora:cyan:0.5> circle <lora:style>", "cyan", -1.5, "a <lora:cyan:-1.5> circle <lora:style>"),
    ("a circle <lora:style>", "style", 0.7, "a circle <lora:style:0.7>"),
    ("a circle <lora:style v2:1>", "style", 1.0, "a circle <lora:style v2:1> <lora:style:1>"),
])
def test_with_prompt_lora_sets_one_tag_and_parses_back(prompt, name, scale, expected):
    assert lora.with_prompt_lora(prompt, name, scale) == expected
    assert (name, scale) in lora.parse_prompt_loras(expected)[1]


@pytest.mark.parametrize("name, scale, said", [("", 1.0, "non-empty"), ("a:b", 1.0, "without"),
                                               ("x>", 1.0, "without"), ("x", float("nan"), "finite")])
def test_with_prompt_lora_refuses_what_a_tag_cannot_hold(name, scale, said):
    with pytest.raises(ValueError, match=said):  # a UsageError
        lora.with_prompt_lora("a circle", name, scale)


def test_parse_prompt_loras_strips_a1111_tags():
    assert lora.parse_prompt_loras("a cyan circle <lora:cyan:0.8> on the left <lora:style>") == (
        "a cyan circle on the left", [("cyan", 0.8), ("style", 1.0)])
    assert lora.parse_prompt_loras("no tags") == ("no tags", [])
    with pytest.raises(ValueError, match="scale must be a number"):
        lora.parse_prompt_loras("<lora:x:strong>")


def test_parse_lora_option_splits_a_trailing_scale():
    assert lora.parse_lora_option("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert lora.parse_lora_option("style.safetensors") == ("style.safetensors", 1.0)
    assert lora.parse_lora_option(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)


def test_cli_generate_takes_repeated_lora_options(tmp_path):
    from kandinsky3.cli import main
    from kandinsky3.pipelines import LoadOptions, load_pipeline

    pipe = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(dtype="fp32"))
    spec = lora.LoraSpec(rank=2)
    _randomize_adapter(lora.inject_lora(pipe.unet, pipe.text_encoder, spec, "a", trainable=True), 0)
    lora.save_lora(tmp_path / "one.safetensors", pipe.unet, pipe.text_encoder, "a", spec=spec,
                   base=lora.base_identity(pipe.unet))
    common = ["generate", "a red circle", "--model", "tiny", "--steps", "2", "--dtype", "fp32", "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "-o", str(tmp_path / "lora.png"), "--lora", str(tmp_path / "one.safetensors"),
                 "--lora", f"{tmp_path / 'one.safetensors'}:0.5"]) == 2  # the same name twice is refused
    assert main([*common, "-o", str(tmp_path / "lora.png"), "--lora", f"{tmp_path / 'one.safetensors'}:3"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "plain.png").tobytes() != Image.open(tmp_path / "lora.png").tobytes()
