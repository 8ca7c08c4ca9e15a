"""Bad input to the Python API (issue: nothing silently wrong, no tracebacks): every mistake is refused up front with
one line naming the value, and numbers that go bad during sampling stop the call instead of writing a black image.
docs/bad-input.md lists the same cases."""

import io
import logging

import numpy as np
import pytest
import torch
from _tiny_models import tiny_components
from PIL import Image

from kandinsky3 import LoadOptions, get_T2I_pipeline, load_pipeline
from kandinsky3.errors import NonFiniteError, UsageError
from kandinsky3.lowmem import compute_dtype, storage_dtype
from kandinsky3.pipelines import Kandinsky3Img2ImgPipeline, Kandinsky3InpaintingPipeline, Kandinsky3Pipeline

FAST = dict(width=16, height=16, steps=3, progress=False)


@pytest.fixture(scope="module")
def t2i():
    return Kandinsky3Pipeline(*tiny_components())


@pytest.fixture(scope="module")
def img2img():
    return Kandinsky3Img2ImgPipeline(*tiny_components())


@pytest.fixture(scope="module")
def inpaint():
    return Kandinsky3InpaintingPipeline(*tiny_components(num_channels=9, seed=3))


class _Calls:
    """Counts the U-Net's network calls (its input layer runs once per call)."""

    def __init__(self, pipe):
        self.count = 0
        self.hook = pipe.unet.in_layer.register_forward_hook(self)

    def __call__(self, *_):
        self.count += 1


@pytest.fixture
def unet_calls(t2i):
    calls = _Calls(t2i)
    yield calls
    calls.hook.remove()


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("arguments, name", [
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(eta=float("nan")), "eta"),
    (dict(eta=float("-inf")), "eta"),
    (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), "latents"),
    (dict(latents=torch.full((1, 4, 8, 8), float("inf"))), "latents"),
])
def test_non_finite_arguments_are_refused_before_the_unet_runs(t2i, unet_calls, arguments, name):
    with pytest.raises(UsageError, match=name):
        t2i("a", **{**FAST, **arguments})
    assert unet_calls.count == 0


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_non_finite_strength_is_refused(img2img, strength):
    with pytest.raises(UsageError, match="strength"):
        img2img("a", _image(16, 16), strength=strength, progress=False)


def test_nan_during_sampling_stops_the_call_naming_the_step(t2i):
    """A U-Net output that turns NaN at the second call stops the run there, not as a black image."""
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    hook = t2i.unet.out_layer.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError, match=r"step 2 of 3 \(t=665\).*compute in fp32"):
            t2i("a", seed=0, **FAST)
    finally:
        hook.remove()
    assert len(calls) == 2  # stopped at once


def test_float16_overflow_stops_with_advice_to_use_bf16_or_fp32():
    unet, movq, text_encoder = tiny_components()
    with torch.no_grad():
        unet.out_layer[-1].weight.mul_(1e5)  # ε of ~1e5 and more: past float16's 65504
    out = Kandinsky3Pipeline(unet, movq, text_encoder)("a", seed=0, output_type="np", **FAST)
    assert np.isfinite(out).all()  # in fp32 the same weights are fine
    with pytest.raises(NonFiniteError, match=r"step 1 of 3 .*float16, which overflows here: load it in bf16 or fp32"):
        Kandinsky3Pipeline(unet.half(), movq, text_encoder)("a", seed=0, **FAST)


def test_a_non_finite_decode_is_an_error_not_a_black_image(t2i):
    handle = t2i.movq.decoder.register_forward_hook(lambda module, inputs, output: output * float("inf"))
    try:
        with pytest.raises(NonFiniteError, match="MoVQ decode .* fp32"):
            t2i("a", seed=0, **FAST)
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------- masks


def _png(array: np.ndarray, mode: str | None = None) -> Image.Image:
    """``array`` saved as a PNG and read back, as a user's mask file would be."""
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return Image.open(buffer)


@pytest.mark.parametrize("make", [
    lambda m: _png(m.astype(np.uint8)),  # mode "L" holding 0 and 1
    lambda m: _png(m.astype(bool)),  # mode "1"
    lambda m: _png((m * 255).astype(np.uint8), "1"),  # mode "1" from a 0/255 image
    lambda m: m.astype(bool),
])
def test_a_mask_of_0_1_values_repaints_what_it_marks(inpaint, make):
    image = _image(30, 22)
    mask = np.zeros((22, 30), dtype=np.float32)
    mask[4:14, 6:20] = 1
    expected = inpaint("a", image, mask, steps=2, seed=0, output_type="np", progress=False)
    got = inpaint("a", image, make(mask), steps=2, seed=0, output_type="np", progress=False)
    assert np.array_equal(got, expected)
    original = np.asarray(image) / 255
    assert np.abs(got[0][mask == 1] - original[mask == 1]).mean() > 0.05  # the marked region was repainted


# ----------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("arguments", [dict(width=0), dict(height=0), dict(width=-64), dict(height=-4)])
def test_zero_or_negative_sizes_are_errors_never_the_default(t2i, img2img, arguments):
    name = next(iter(arguments))
    with pytest.raises(UsageError, match=f"{name} must be a positive multiple of 4"):
        t2i("a", **{**FAST, **arguments})
    with pytest.raises(UsageError, match=f"{name} must be a positive multiple of 4"):
        img2img("a", _image(16, 16), steps=10, progress=False, **arguments)


def test_sizes_off_the_models_multiple_name_it_and_the_nearest_sizes():
    pipe = load_pipeline("text-to-image", "tiny", device="cpu")
    with pytest.raises(UsageError, match="width=80 is not a multiple of 64; the nearest valid sizes are 64 and 128"):
        pipe("a", width=80, height=64, progress=False)
    with pytest.raises(UsageError, match="height=16 is not a multiple of 64; the nearest valid sizes are 64"):
        pipe("a", width=64, height=16, progress=False)
    with pytest.raises(UsageError, match="width must be a positive int"):
        pipe("a", width=64.0, progress=False)


@pytest.mark.parametrize("size", [(30, 22), (2, 2), (17, 9)])
def test_img2img_returns_images_of_the_input_size(img2img, size):
    image = _image(*size)
    (out,) = img2img("a", image, steps=4, strength=0.5, seed=0, progress=False)
    assert out.size == size
    array = img2img("a", image, steps=4, strength=0.5, seed=0, progress=False, output_type="np")
    assert array.shape == (1, size[1], size[0], 3)
    several = img2img(["a", "b"], [image, _image(12, 8)], steps=4, strength=0.5, seed=0, progress=False)
    assert [i.size for i in several] == [size, (12, 8)]
    with pytest.raises(UsageError, match="different sizes"):
        img2img(["a", "b"], [image, _image(12, 8)], steps=4, progress=False, output_type="np")


# ----------------------------------------------------------------------------------------------- seeds, prompts, names


@pytest.mark.parametrize("seed", [1.5, 2.0, True, 2**63, 2**70, -1, "7"])
def test_seeds_outside_the_int64_range_or_not_ints_are_refused(t2i, unet_calls, seed):
    with pytest.raises(UsageError, match=r"seed must be an int in \[0, 2\*\*63 - 1\]"):
        t2i("a", seed=seed, **FAST)
    assert unet_calls.count == 0


def test_the_largest_seed_works(t2i):
    a = t2i("a", seed=2**63 - 1, output_type="latent", **FAST)
    b = t2i("a", seed=np.int64(2**63 - 1), output_type="latent", **FAST)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arguments, name", [
    (dict(prompt=123), "prompt"),
    (dict(prompt=None), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=["a", 2]), "prompt"),
    (dict(prompt="a", negative_prompt=[1]), "negative_prompt"),
    (dict(prompt="a", negative_prompt=5), "negative_prompt"),
    (dict(prompt=torch.zeros(8, 8)), "prompt"),
])
def test_prompts_of_the_wrong_type_name_the_argument_and_the_accepted_types(t2i, arguments, name):
    with pytest.raises(UsageError) as error:
        t2i(**{**FAST, **arguments})
    assert isinstance(error.value, TypeError)  # a UsageTypeError: callers catching either see it
    assert str(error.value).startswith(f"{name} must be a str or a non-empty list of str, got ")
    assert "\n" not in str(error.value) and len(str(error.value)) < 150


def test_num_inference_steps_is_an_alias_of_steps(t2i):
    seen = []
    arguments = dict(width=16, height=16, progress=False, seed=0, output_type="latent")
    by_alias = t2i("a", num_inference_steps=4, callback=lambda info: seen.append(info["t"]), **arguments)
    assert len(seen) == 4
    assert torch.equal(by_alias, t2i("a", steps=4, **arguments))
    with pytest.raises(UsageError, match="pass either num_inference_steps or steps, not both"):
        t2i("a", num_inference_steps=4, steps=5, **arguments)


@pytest.mark.parametrize("arguments, message", [
    (dict(steps=2.5), "steps must be an int >= 1"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an int >= 1"),
    (dict(guidance_scale="3"), "guidance_scale must be a number"),
    (dict(callback=3), "callback must be a function"),
    (dict(generator=[torch.Generator()] * 2), "2 generators for 1 images"),
    (dict(decode_slice_size=0), "decode_slice_size must be an int >= 1"),
    (dict(mask=np.ones((16, 16))), "no argument 'mask'"),
])
def test_other_bad_arguments_get_one_line_naming_them(t2i, arguments, message):
    with pytest.raises(UsageError, match=message) as error:
        t2i("a", **{**FAST, **arguments})
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------- devices and dtypes


def _no_checkpoint_opened(monkeypatch):
    from kandinsky3.pipelines import load

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was opened before the device was checked")

    monkeypatch.setattr(load, "open_checkpoint", refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("make", [
    lambda: load_pipeline("text-to-image", "tiny", device="cuda"),
    lambda: load_pipeline("text-to-image", "tiny", device={"unet": "cuda:0", "movq": "cpu", "text_encoder": "cpu"}),
    lambda: get_T2I_pipeline("cuda", fp16=True, model="tiny"),
])
def test_cuda_without_cuda_is_one_usage_error_before_anything_loads(monkeypatch, make):
    _no_checkpoint_opened(monkeypatch)
    with pytest.raises(UsageError, match="no usable CUDA device .* use device='cpu' or 'auto'"):
        make()


@pytest.mark.parametrize("device", ["tpu", "xla", "meta", "cuda:x", 3.5])
def test_devices_that_do_not_exist_here_are_refused_before_anything_loads(monkeypatch, device):
    _no_checkpoint_opened(monkeypatch)
    with pytest.raises(UsageError, match="device"):
        load_pipeline("text-to-image", "tiny", device=device)


def test_half_precision_on_a_cpu_without_fast_half_math_warns(monkeypatch, caplog):
    from kandinsky3.lowmem import placement

    monkeypatch.setattr(placement, "_cpu_half_is_fast", lambda dtype: False)
    with caplog.at_level(logging.INFO, logger="kandinsky3.pipelines.load"):
        pipe = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(dtype="fp16"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("unet: float16 requested, but this device computes float16 slowly") and
               "computed in float32" in m for m in warnings), warnings
    assert storage_dtype(pipe.unet) == torch.float16 and compute_dtype(pipe.unet) == torch.float32
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kandinsky3.pipelines.load"):
        load_pipeline("text-to-image", "tiny", device="cpu",
                      options=LoadOptions(dtype="fp16", compute_dtype="fp32"))  # asked for: nothing to warn about
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
