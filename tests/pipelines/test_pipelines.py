"""Behaviour of the pipelines on tiny random models: reproducibility, batching, negative
prompts, inpainting paste-back, output types and the errors for bad input."""

import numpy as np
import pytest
import torch
from _tiny_models import tiny_components
from PIL import Image

from kandinsky3.components import SamplingDefaults
from kandinsky3.pipelines.img2img import Kandinsky3Img2ImgPipeline
from kandinsky3.pipelines.inpainting import Kandinsky3InpaintingPipeline, working_size
from kandinsky3.pipelines.text_to_image import Kandinsky3Pipeline

FAST = dict(width=16, height=16, steps=3, progress=False)


@pytest.fixture(scope="module")
def t2i():
    return Kandinsky3Pipeline(*tiny_components())


@pytest.fixture(scope="module")
def inpaint():
    return Kandinsky3InpaintingPipeline(*tiny_components(num_channels=9, seed=3))


def test_same_seed_gives_bit_identical_images(t2i):
    first = t2i("a red circle", seed=11, output_type="np", **FAST)
    second = t2i("a red circle", seed=11, output_type="np", **FAST)
    other = t2i("a red circle", seed=12, output_type="np", **FAST)
    assert np.array_equal(first, second)
    assert np.abs(first - other).max() > 1e-3


def test_batch_of_prompts_equals_prompts_one_by_one(t2i):
    prompts = ["a red circle", "a small blue square on the left", "a green triangle"]
    batch = t2i(prompts, seed=3, output_type="np", **FAST)
    single = [t2i(p, seed=3 + i, output_type="np", **FAST)[0] for i, p in enumerate(prompts)]
    # batched and single matmuls round differently; the images agree to float noise
    assert np.abs(batch - np.stack(single)).max() < 1e-4


def test_mini_batches_equal_one_batch(t2i):
    whole = t2i(["a", "b", "c"], seed=0, output_type="latent", **FAST)
    parts = t2i(["a", "b", "c"], seed=0, bs=2, output_type="latent", **FAST)
    assert torch.allclose(whole, parts, atol=1e-5)


def test_num_images_per_prompt_and_output_types(t2i):
    pil = t2i(["a", "b"], num_images_per_prompt=2, seed=0, **FAST)
    assert len(pil) == 4 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in pil)
    pt = t2i("a", images_num=2, seed=0, output_type="pt", **FAST)
    assert pt.shape == (2, 3, 16, 16) and pt.min() >= 0 and pt.max() <= 1
    latent = t2i("a", seed=0, output_type="latent", **FAST)
    assert latent.shape == (1, 4, 8, 8)
    np_out = t2i("a", seed=0, output_type="np", **FAST)
    assert np.allclose(np_out, pt[:1].permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_negative_prompt_changes_the_image(t2i):
    plain = t2i("a red circle", seed=1, output_type="np", **FAST)
    negative = t2i("a red circle", negative_prompt="a blue square", seed=1, output_type="np", **FAST)
    assert np.abs(plain - negative).max() > 1e-3


def test_given_latents_are_the_start_noise(t2i):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    a = t2i("a", latents=latents, seed=1, output_type="latent", sampler="ddim", **FAST)
    b = t2i("a", latents=latents, seed=2, output_type="latent", sampler="ddim", **FAST)
    assert torch.equal(a, b)  # deterministic DDIM: the seed plays no part once latents are given


def test_callback_sees_every_step(t2i):
    seen = []
    t2i("a", seed=0, callback=lambda info: seen.append(info["t"]), output_type="latent", **FAST)
    assert seen == [999, 665, 331]  # original sampler: stride ceil(1000/3) = 334 from 999 (docs/architecture.md §5.5)


@pytest.mark.parametrize("sampler, stochastic", [("original", True), ("original30", True), ("ddpm", True),
                                                  ("ddim", False), ("dpmpp_2m", False), ("dpmpp_2m_sde", True)])
def test_every_sampler_runs_and_draws_noise_only_if_stochastic(t2i, sampler, stochastic):
    """With the start latents fixed, the seed reaches the result only through a stochastic sampler's noise."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    run = lambda seed: t2i("a", latents=latents, seed=seed, sampler=sampler, output_type="latent", **FAST)  # noqa: E731
    first, again, other = run(0), run(0), run(1)
    assert torch.isfinite(first).all() and torch.equal(first, again)
    assert torch.equal(first, other) != stochastic


def test_bad_sizes_name_the_nearest_valid_ones():
    unet, movq, text_encoder = tiny_components()
    pipe = Kandinsky3Pipeline(unet, movq, text_encoder)
    with pytest.raises(ValueError, match="width=18 is not a multiple of 4; the nearest valid sizes are 16 and 20"):
        pipe("a", width=18, height=16, steps=2, progress=False)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(prompt=3), TypeError),
        (dict(prompt=[]), TypeError),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), ValueError),
        (dict(prompt="a", output_type="jpeg"), ValueError),
        (dict(prompt="a", guidance_scale=-1), ValueError),
        (dict(prompt="a", sampler="euler"), ValueError),
        (dict(prompt="a", sampler="flash"), ValueError),
        (dict(prompt="a", latents=torch.zeros(1, 4, 4, 4)), ValueError),
        (dict(prompt="a", seed=1, generator=torch.Generator()), ValueError),
        (dict(prompt="a", eta=0.5, sampler="dpmpp_2m"), ValueError),
        (dict(prompt="a", bs=0), ValueError),
        (dict(prompt="a", stepz=3), TypeError),
    ],
)
def test_bad_arguments_raise_early(t2i, kwargs, error):
    with pytest.raises(error):
        t2i(**{**FAST, **kwargs})


def test_a_call_takes_what_it_leaves_out_from_the_models_sampling_defaults():
    """Size, guidance, sampler and steps the model records; its step count goes with its sampler only."""
    defaults = SamplingDefaults(width=16, height=8, guidance_scale=1.5, steps=3, sampler="ddim")
    pipe = Kandinsky3Pipeline(*tiny_components(), sampling_defaults=defaults)
    assert pipe.default_sampler == "ddim"
    seen = []
    implied = pipe("a", seed=0, output_type="np", progress=False, callback=lambda info: seen.append(info["t"]))
    explicit = pipe("a", seed=0, output_type="np", progress=False, width=16, height=8, guidance_scale=1.5, steps=3,
                    sampler="ddim")
    assert implied.shape == (1, 8, 16, 3) and len(seen) == 3 and np.array_equal(implied, explicit)
    seen.clear()
    pipe("a", seed=0, sampler="ddpm", output_type="latent", progress=False, callback=lambda info: seen.append(1))
    assert len(seen) == 25  # another sampler runs its own default steps, not the model's


def test_flash_refuses_what_it_would_ignore():
    pipe = Kandinsky3Pipeline(*tiny_components(), flash=True)
    out = pipe("a", seed=0, output_type="latent", width=16, height=16, progress=False)
    assert out.shape == (1, 4, 8, 8)
    for kwargs in (dict(guidance_scale=3.0), dict(negative_prompt="x"), dict(steps=50), dict(eta=1.0)):
        with pytest.raises(ValueError, match="Kandinsky Flash"):
            pipe("a", width=16, height=16, progress=False, **kwargs)


def _image_and_mask(width=30, height=22):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
    mask = np.zeros((height, width), dtype=np.float32)
    mask[4:14, 6:20] = 1
    return image, mask


def test_inpainting_keeps_every_unmasked_pixel_and_the_input_size(inpaint):
    image, mask = _image_and_mask()
    out = inpaint("a red circle", image, mask, steps=3, seed=0, progress=False)[0]
    assert out.size == image.size
    got, original = np.asarray(out), np.asarray(image)
    assert np.array_equal(got[mask == 0], original[mask == 0])
    assert (got[mask == 1] != original[mask == 1]).mean() > 0.5


def test_inpainting_accepts_pil_and_0_255_masks_and_negative_prompts(inpaint):
    image, mask = _image_and_mask()
    as_01 = inpaint("a", image, mask, steps=2, seed=0, output_type="np", progress=False)
    as_255 = inpaint("a", image, (mask * 255).astype(np.uint8), steps=2, seed=0, output_type="np", progress=False)
    as_pil = inpaint("a", image, Image.fromarray((mask * 255).astype(np.uint8)), steps=2, seed=0,
                     output_type="np", progress=False)
    assert np.array_equal(as_01, as_255) and np.array_equal(as_01, as_pil)
    negative = inpaint("a", image, mask, negative_prompt="blue", steps=2, seed=0, output_type="np", progress=False)
    assert np.abs(negative - as_01).max() > 1e-4


def test_inpainting_without_paste_back_regenerates_everything(inpaint):
    image, mask = _image_and_mask()
    out = np.asarray(inpaint("a", image, mask, steps=2, seed=0, paste_back=False, progress=False)[0])
    assert not np.array_equal(out[mask == 0], np.asarray(image)[mask == 0])


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.zeros((22, 30)), "all zero"),
        (np.ones((10, 10)), "same size"),
        (np.ones((22, 30, 3)), "2-D"),
        (np.full((22, 30), 300.0), r"\[0, 255\]"),
    ],
)
def test_inpainting_rejects_bad_masks(inpaint, mask, message):
    image, _ = _image_and_mask()
    with pytest.raises(ValueError, match=message):
        inpaint("a", image, mask, steps=2, progress=False)


def test_inpainting_needs_a_nine_channel_unet():
    with pytest.raises(ValueError, match="9 input channels"):
        Kandinsky3InpaintingPipeline(*tiny_components())


def test_working_size_caps_at_one_megapixel_and_floors_to_64():
    assert working_size(1024, 1024) == (1024, 1024)
    assert working_size(2048, 1024) == (1408, 704)
    assert working_size(700, 500) == (640, 448)
    with pytest.raises(ValueError, match="too small"):
        working_size(40, 500)


def test_img2img_runs_the_strength_share_and_accepts_latents():
    pipe = Kandinsky3Img2ImgPipeline(*tiny_components())
    image, _ = _image_and_mask(32, 24)
    seen = []
    out = pipe("a", image, strength=0.5, steps=10, seed=0, sampler="ddim",
               callback=lambda i: seen.append(i["t"]), output_type="np", progress=False)
    assert out.shape == (1, 24, 32, 3) and len(seen) == 5
    latents = torch.randn(1, 4, 12, 16)
    from_latents = pipe("a", latents, strength=0.3, seed=0, output_type="latent", progress=False)
    assert from_latents.shape == (1, 4, 12, 16)
    with pytest.raises(ValueError, match="strength"):
        pipe("a", image, strength=0.0, progress=False)


class _RecordingModule(torch.nn.Linear):
    """Records the devices it is sent to instead of moving (no second device exists in the tests)."""

    def __init__(self):
        super().__init__(1, 1)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]))
        return self


def test_offload_moves_a_component_to_its_device_only_while_it_runs():
    from kandinsky3.lowmem.residency import check_offload, placed

    module = _RecordingModule()
    offload = check_offload({"unet": "cpu", "text_encoder": "meta", "movq": "cpu"})
    with placed(module, "text_encoder", offload):
        assert module.moves == ["meta"]
    assert module.moves == ["meta", "cpu"]
    with placed(module, "text_encoder"):
        pass
    assert module.moves == ["meta", "cpu"]
    with pytest.raises(ValueError, match="offload must map"):
        check_offload({"unet": "cpu"})


def test_offloaded_pipeline_gives_the_same_images():
    components = tiny_components()
    plain = Kandinsky3Pipeline(*components)("a red circle", seed=0, output_type="np", **FAST)
    offload = {"unet": "cpu", "text_encoder": "cpu", "movq": "cpu"}
    offloaded = Kandinsky3Pipeline(*components, offload=offload)("a red circle", seed=0, output_type="np", **FAST)
    assert np.array_equal(plain, offloaded)


def test_norm_projections_run_once_per_mini_batch_and_change_nothing(t2i, monkeypatch):
    """The pipeline precomputes the conditional norms' inputs for all steps (UNet.bind): each
    projection runs once per mini-batch, not once per step, and the images equal the per-step path's."""
    from kandinsky3.pipelines import stages

    norms = [m for m in t2i.unet.modules() if hasattr(m, "context_mlp")]
    calls = []
    hooks = [norm.context_mlp[1].register_forward_hook(lambda *_: calls.append(1)) for norm in norms]
    try:
        kwargs = dict(prompt=["a", "b b b"], seed=0, output_type="np", bs=1, width=16, height=16, steps=4,
                      progress=False)
        tabled = t2i(**kwargs)
        assert len(calls) == 2 * len(norms)  # two mini-batches, four steps each
        monkeypatch.setattr(stages, "MODULATION_TABLE_LIMIT", 0)
        calls.clear()
        per_step = t2i(**kwargs)
        assert len(calls) == 2 * 4 * len(norms)
    finally:
        for hook in hooks:
            hook.remove()
    assert np.abs(tabled - per_step).max() <= 1e-5
