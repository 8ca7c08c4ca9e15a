"""load_pipeline and the seed's factories load tiny checkpoints written in each layout and build working pipelines.

Parity: a diffusers pipeline folder saved by diffusers' own ``save_pretrained`` is loaded both by
``diffusers.Kandinsky3Pipeline.from_pretrained`` and by our ``get_T2I_pipeline(model=folder)``;
with the same latents and deterministic DDIM the images agree to 1e-4 (float rounding only).
"""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from _checkpoints import write_diffusers, write_original
from PIL import Image

from kandinsky3 import (
    LoadOptions,
    get_img2img_pipeline,
    get_inpainting_pipeline,
    get_T2I_Flash_pipeline,
    get_T2I_pipeline,
    load_pipeline,
)
from kandinsky3.errors import UsageError
from kandinsky3.lowmem import compute_dtype, half_precision_is_fast, storage_dtype
from kandinsky3.pipelines import Kandinsky3Pipeline, load
from kandinsky3.pipelines.load import legacy_options, resolve_devices

FAST = dict(width=16, height=16, progress=False)
TINY = dict(head_dim=4, groups=4)  # not determined by the shapes of original-layout files


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_original(tmp_path_factory.mktemp("k31"), variants=("base", "flash", "inpainting"))


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return write_diffusers(tmp_path_factory.mktemp("community"))


def test_original_layout_gives_the_same_images_as_the_written_networks(original):
    pipe = get_T2I_pipeline("cpu", dtype_map="fp32", model=original.root, load_options=TINY)
    assert pipe.conditioning == "original" and pipe.default_sampler == "original"
    reference = Kandinsky3Pipeline(original.unets["base"].eval(), original.movq.eval(), original.texts["base"])
    got = pipe(["a red circle", "a blue square"], steps=3, seed=0, output_type="np", **FAST)
    expected = reference(["a red circle", "a blue square"], steps=3, seed=0, output_type="np", **FAST)
    assert np.abs(got - expected).max() <= 1e-6


def test_flash_and_inpainting_variants_load_their_own_weights(original):
    flash = get_T2I_Flash_pipeline("cpu", model=original.root, load_options=TINY)
    assert flash.flash
    assert torch.equal(flash.unet.in_layer.weight, original.unets["flash"].in_layer.weight)
    assert flash("a", seed=0, output_type="latent", **FAST).shape == (1, 4, 8, 8)
    inpaint = get_inpainting_pipeline("cpu", model=original.root, load_options=TINY)
    assert inpaint.unet.config.num_channels == 9
    image = Image.new("RGB", (16, 16), (200, 10, 10))
    mask = np.zeros((16, 16))
    mask[4:12, 4:12] = 1
    out = inpaint("a", image, mask, steps=2, seed=0, progress=False)[0]
    assert out.size == (16, 16)


@pytest.mark.parametrize(
    "dtype, steps, tolerance",
    [
        # fp32: the U-Nets agree to ~2e-6 per call; CFG (×4) and x̂₀ = (x − √(1−ᾱ)ε)/√ᾱ (×30 at t=961)
        # amplify that rounding step by step, so few steps keep it well inside 1e-4.
        (torch.float32, 3, 1e-4),
        # fp64: the same computation without rounding noise; the images (cast to fp32) agree exactly.
        (torch.float64, 5, 1e-6),
    ],
)
def test_diffusers_folder_matches_diffusers_own_pipeline(diffusers_folder, dtype, steps, tolerance):
    from diffusers import DDIMScheduler
    from diffusers import Kandinsky3Pipeline as DiffusersPipeline

    reference = DiffusersPipeline.from_pretrained(str(diffusers_folder.root)).to(dtype=dtype)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    ours = get_T2I_pipeline("cpu", dtype_map=dtype, model=diffusers_folder.root)
    assert ours.conditioning == "diffusers" and ours.default_sampler == "ddpm"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=dtype)
    expected = reference("a yellow circle", num_inference_steps=steps, latents=latents, height=16, width=16,
                         output_type="np").images
    got = ours("a yellow circle", steps=steps, sampler="ddim", eta=0.0, latents=latents, output_type="np", **FAST)
    diff = np.abs(got - expected).max()
    print(f"diffusers folder, text-to-image, {dtype}, {steps} steps: max-abs {diff:.2e}")
    assert diff <= tolerance


def test_diffusers_folder_img2img_matches_diffusers(diffusers_folder):
    from diffusers import DDIMScheduler
    from diffusers import Kandinsky3Img2ImgPipeline as DiffusersImg2Img

    reference = DiffusersImg2Img.from_pretrained(str(diffusers_folder.root))
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8))
    expected = reference("a yellow circle", image=image, strength=0.5, num_inference_steps=8,
                         generator=torch.Generator().manual_seed(2), output_type="np").images
    got = get_img2img_pipeline("cpu", dtype_map="fp32", model=diffusers_folder.root)(
        "a yellow circle", image, strength=0.5, steps=8, sampler="ddim", eta=0.0,
        generator=torch.Generator().manual_seed(2), output_type="np", progress=False,
    )
    diff = np.abs(got - expected).max()
    print(f"diffusers folder, img2img: max-abs {diff:.2e}")
    assert diff <= 1e-4


def test_device_and_dtype_maps_place_each_component(original):
    pipe = get_T2I_pipeline(
        {"unet": "cpu", "text_encoder": "cpu", "movq": "cpu"},
        dtype_map={"unet": torch.bfloat16, "text_encoder": "fp32", "movq": torch.float32},
        model=original.root, load_options=TINY,
    )
    # bf16 is stored as asked on every machine; it is computed in bf16 only where the CPU computes it fast
    fast = half_precision_is_fast("cpu", torch.bfloat16)
    assert storage_dtype(pipe.unet) == torch.bfloat16
    assert compute_dtype(pipe.unet) == (torch.bfloat16 if fast else torch.float32)
    assert storage_dtype(pipe.movq) == compute_dtype(pipe.movq) == torch.float32
    image = pipe("a red circle", steps=2, seed=0, output_type="np", **FAST)
    assert np.isfinite(image).all()


def test_the_tiny_model_renders_at_its_own_size_through_the_api():
    """No width/height: the size the model records (the bundled tiny model was trained at 128 px), not 1024."""
    pipe = get_T2I_pipeline("cpu", model="tiny")
    assert (pipe.sampling_defaults.width, pipe.sampling_defaults.height) == (128, 128)
    assert pipe("a red circle", steps=2, seed=0, progress=False)[0].size == (128, 128)


@pytest.mark.parametrize("offload", [None, "disk"])
def test_a_loaded_pipeline_holds_frozen_weights(offload):
    """Every weight of every component comes frozen, as the disk reloads too: a pipeline only infers, and a CPU layer
    picks its kernel by ``requires_grad``, so anything that freezes them later (a LoRA's inject and unload) would
    otherwise change the images by float rounding."""
    pipe = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(offload=offload))
    pipe("a red circle", steps=1, seed=0, progress=False)  # a disk offload reads its components during the call
    for name in ("unet", "movq", "text_encoder"):
        assert not any(p.requires_grad for p in getattr(pipe, name).parameters()), name


def test_the_layout_is_detected_once_per_call(original, monkeypatch):
    opened = []
    real = load.open_checkpoint
    monkeypatch.setattr(load, "open_checkpoint", lambda *args, **kwargs: opened.append(args) or real(*args, **kwargs))
    pipe = load_pipeline("inpainting", original.root, device="cpu", options=LoadOptions(dtype="fp32", **TINY))
    assert len(opened) == 1 and pipe.unet.config.num_channels == 9


def test_the_placement_is_said_in_one_info_line(caplog):
    with caplog.at_level(logging.INFO, logger="kandinsky3"):
        load_pipeline("text-to-image", "tiny", device="cpu")
    assert len([record for record in caplog.records if "placement" in record.getMessage()]) == 1


def test_fp16_is_half_storage_with_fp32_math_where_half_math_is_slow(original, caplog):
    """The 3.0 API's fp16=True: the U-Net and MoVQ stored in fp16; on a device without fast fp16 math they compute
    in fp32, which the placement line says."""
    with caplog.at_level(logging.INFO, logger="kandinsky3"):
        pipe = get_T2I_pipeline("cpu", fp16=True, model=original.root, load_options=TINY)
    fast = half_precision_is_fast("cpu", torch.float16)
    assert storage_dtype(pipe.unet) == storage_dtype(pipe.movq) == torch.float16
    assert compute_dtype(pipe.unet) == compute_dtype(pipe.movq) == (torch.float16 if fast else torch.float32)
    [summary] = [record.getMessage() for record in caplog.records if "placement" in record.getMessage()]
    assert ("computed in fp32" in summary) != fast
    assert np.isfinite(pipe("a red circle", steps=2, seed=0, output_type="np", **FAST)).all()


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(dtype="int8"), "dtype"),
        (dict(dtype={"vae": "fp16"}), "dtype"),
        (dict(dtype={"unet": torch.int8}), "dtype"),
        (dict(compute_dtype="fp8"), "compute_dtype"),
        (dict(stream_t5="sometimes"), "stream_t5"),
        (dict(offload="ram"), "offload"),
        (dict(t5_prefetch=1), "t5_prefetch"),
        (dict(unet_path=3), "unet_path"),
        (dict(unet_config={"model_channels": 32}), "unet_config"),
        (dict(head_dim=0), "head_dim"),
    ],
)
def test_a_wrong_option_value_is_a_usage_error_naming_the_field(options, field):
    with pytest.raises(UsageError, match=rf"LoadOptions\.{field}"):
        LoadOptions(**options)


def test_load_options_are_frozen_and_hold_parsed_dtypes():
    options = LoadOptions(dtype={"unet": "bf16"}, compute_dtype="fp32")
    assert options.dtype["unet"] is torch.bfloat16 and options.compute_dtype is torch.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.offload = "disk"
    with pytest.raises(TypeError):
        options.dtype["movq"] = torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_anything_is_read():
    with pytest.raises(UsageError, match="no usable CUDA device"):
        get_T2I_pipeline("cuda", model="/no/such/folder")  # a FileNotFoundError would mean the folder was opened
    with pytest.raises(UsageError, match="no usable CUDA device"):
        load_pipeline("text-to-image", "/no/such/folder", device={"unet": "cpu", "text_encoder": "cuda:0",
                                                                   "movq": "cpu"})
    assert set(resolve_devices("auto").values()) == {torch.device("cpu")}


def test_a_device_map_needs_every_component_and_real_devices():
    with pytest.raises(UsageError, match="missing"):
        resolve_devices({"unet": "cpu"})
    with pytest.raises(UsageError, match="not a device"):
        resolve_devices("gpu0")
    with pytest.raises(UsageError, match="unknown task"):
        load_pipeline("text2img", "tiny", device="cpu")


def test_the_seed_arguments_become_load_options():
    device, options = legacy_options({"unet": "cpu", "text_encoder": "cpu", "movq": "cpu"}, True, offload="disk",
                                     load_options={"stream_t5": "auto", "head_dim": 4}, unet_path="u.pt")
    assert device == {"unet": "cpu", "text_encoder": "cpu", "movq": "cpu"}
    assert options == LoadOptions(dtype={"unet": torch.float16, "movq": torch.float16}, offload="disk", head_dim=4,
                                  unet_path="u.pt")
    assert legacy_options("cpu", dtype_map="bf16")[1].dtype is torch.bfloat16
    with pytest.raises(UsageError, match="either fp16"):
        legacy_options("cpu", True, dtype_map=torch.float16)
    with pytest.raises(TypeError, match="unknown load_options"):
        legacy_options("cpu", load_options={"dtype": "fp16"})  # the dtype goes through dtype_map


def test_unsupported_quantised_loading_is_refused(original):
    with pytest.raises(TypeError, match="8/4-bit"):
        get_T2I_pipeline("cpu", model=original.root, load_options=TINY, load_in_8bit=True)


@pytest.mark.parametrize("layout, task", [("diffusers", "text-to-image"), ("original", "flash"),
                                          ("original", "inpainting")])
def test_model_facts_before_loading_agree_with_the_loaded_pipeline(original, diffusers_folder, layout, task):
    """What the command line and the server check before loading (model_facts) is what the pipeline checks."""
    from kandinsky3.pipelines import ModelFacts, model_facts

    root, options = (diffusers_folder.root, LoadOptions()) if layout == "diffusers" else \
        (original.root, LoadOptions(**TINY))
    before = model_facts(root, task, options, device="cpu")
    after = ModelFacts.of_pipeline(load_pipeline(task, root, device="cpu", options=options))
    for name in ("task", "unet_config", "movq_config", "sampling_defaults", "default_sampler",
                 "default_guidance_scale", "threshold_percentile", "scheduler_config"):
        assert getattr(before, name) == getattr(after, name), name
    assert dict(before.compute_dtypes) == dict(after.compute_dtypes)
    assert before.default_sampler == {"diffusers": "ddpm", "original": "original"}[layout] or task == "flash"
    assert before.flash == (task == "flash") and before.inpainting == (task == "inpainting")
