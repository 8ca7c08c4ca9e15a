"""The factories load tiny checkpoints written in each layout and build working pipelines.

Parity: a diffusers pipeline folder saved by diffusers' own ``save_pretrained`` is loaded both by
``diffusers.Kandinsky3Pipeline.from_pretrained`` and by our ``get_T2I_pipeline(model=folder)``;
with the same latents and deterministic DDIM the images agree to 1e-4 (float rounding only).
"""

import numpy as np
import pytest
import torch
from _checkpoints import write_diffusers, write_original
from PIL import Image

from kandinsky3 import get_img2img_pipeline, get_inpainting_pipeline, get_T2I_Flash_pipeline, get_T2I_pipeline
from kandinsky3.pipelines import Kandinsky3Pipeline
from kandinsky3.pipelines.factory import placement

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
    assert pipe.unet.in_layer.weight.dtype == torch.bfloat16
    assert pipe.movq.decoder.conv_in.weight.dtype == torch.float32
    image = pipe("a red circle", steps=2, seed=0, output_type="np", **FAST)
    assert np.isfinite(image).all()


def test_placement_defaults_and_errors():
    places = placement("cpu", None, fp16=True, tiny=False)
    assert places["unet"][1] == torch.float16 and places["text_encoder"][1] == torch.bfloat16
    assert placement("cpu", None, fp16=False, tiny=True)["text_encoder"][1] == torch.float32
    with pytest.raises(ValueError, match="missing"):
        placement({"unet": "cpu"}, None, fp16=False, tiny=False)
    with pytest.raises(ValueError, match="either fp16"):
        placement("cpu", torch.float16, fp16=True, tiny=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        placement("cpu", "int8", fp16=False, tiny=False)


def test_unsupported_quantised_loading_is_refused(original):
    with pytest.raises(TypeError, match="8/4-bit"):
        get_T2I_pipeline("cpu", model=original.root, load_options=TINY, load_in_8bit=True)
