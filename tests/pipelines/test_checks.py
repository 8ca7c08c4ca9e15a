"""The one check of a generation call (kandinsky3.pipelines.checks): model facts read without weights, the request
it returns, that the pipelines run it first, and the memory and time estimates behind the size limits."""

import logging
import math

import pytest
import torch
from _tiny_models import tiny_components

from kandinsky3.errors import UsageError
from kandinsky3.pipelines import (
    GenerationRequest,
    Kandinsky3Pipeline,
    ModelFacts,
    base,
    budget,
    check_generation,
    load_pipeline,
    model_facts,
)


@pytest.fixture(scope="module")
def tiny_facts():
    return model_facts("tiny", "text-to-image", device="cpu")


@pytest.fixture(scope="module")
def tiny_pipe():
    return load_pipeline("text-to-image", "tiny", device="cpu")


def test_model_facts_read_configs_and_headers_only(monkeypatch):
    """The bundled model's facts (size multiple 32 = MoVQ 4 × U-Net 8) come without a single weight read."""
    from kandinsky3.weights import build

    def no_weights(*args, **kwargs):
        raise AssertionError("model_facts read weights")

    monkeypatch.setattr(build, "instantiate", no_weights)
    monkeypatch.setattr(build, "instantiate_text_encoder", no_weights)
    facts = model_facts("tiny", "text-to-image", device="cpu")
    assert facts.size_multiple == 64 and facts.latent_factor == 8 and facts.latent_channels == 4
    assert not facts.flash and not facts.inpainting
    assert (facts.sampling_defaults.width, facts.sampling_defaults.height) == (128, 128)
    assert facts.default_sampler == "original" and facts.pending_bytes["unet"] > 0  # nothing loaded yet
    inpainting = model_facts("tiny", "inpainting", device="cpu")
    assert inpainting.inpainting and inpainting.default_guidance_scale == 4.0
    assert inpainting.threshold_percentile == 0.95


def test_facts_before_loading_equal_the_loaded_pipelines(tiny_facts, tiny_pipe):
    loaded = ModelFacts.of_pipeline(tiny_pipe)
    for name in ("task", "unet_config", "movq_config", "sampling_defaults", "default_sampler",
                 "default_guidance_scale", "threshold_percentile", "scheduler_config", "decode_tile"):
        assert getattr(loaded, name) == getattr(tiny_facts, name), name
    assert dict(loaded.devices) == dict(tiny_facts.devices)
    assert dict(loaded.compute_dtypes) == dict(tiny_facts.compute_dtypes)
    assert dict(loaded.pending_bytes) == {"unet": 0, "movq": 0}  # loaded: nothing left to arrive


def test_weights_waiting_on_disk_count_as_still_to_load():
    from kandinsky3 import LoadOptions

    on_disk = load_pipeline("text-to-image", "tiny", device="cpu", options=LoadOptions(offload="disk"))
    facts = ModelFacts.of_pipeline(on_disk)
    skeletons = {name: sum(p.numel() * p.element_size() for p in module.parameters())
                 for name, module in (("unet", on_disk.unet), ("movq", on_disk.movq))}
    assert all(size > 0 for size in skeletons.values())
    assert all(facts.pending_bytes[name] >= size for name, size in skeletons.items())
    assert dict(facts.devices) == {"unet": torch.device("cpu"), "movq": torch.device("cpu")}


def test_check_generation_fills_in_the_models_defaults(tiny_facts):
    request = check_generation("text-to-image", tiny_facts, prompt=["a", "b"], num_images_per_prompt=2)
    assert isinstance(request, GenerationRequest)
    assert (request.width, request.height) == (128, 128)
    assert (request.sampler, request.steps, request.guidance_scale, request.eta) == ("original", 50, 1.5, 1.0)
    assert request.batch.prompts == ["a", "a", "b", "b"] and request.num_images == 4
    assert isinstance(request.seed, int) and 0 <= request.seed < 2**31  # drawn, so it can be recorded
    assert len(request.plan.timesteps) == 50 and request.output_type == "pil" and request.peak_bytes > 0
    ddim = check_generation("text-to-image", tiny_facts, prompt="a", sampler="ddim", seed=5, width=192, height=64)
    assert (ddim.sampler, ddim.steps, ddim.eta, ddim.seed, ddim.width, ddim.height) == ("ddim", 50, 0.0, 5, 192, 64)


def test_pipelines_run_check_generation_first(tiny_pipe, monkeypatch):
    """__call__ = generate(check_generation(...)): a refusal means no network ran."""
    seen = []
    real = base.check_generation

    def spy(task, facts, **arguments):
        seen.append((task, sorted(arguments)))
        return real(task, facts, **arguments)

    monkeypatch.setattr(base, "check_generation", spy)
    calls = []
    hook = tiny_pipe.unet.in_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(UsageError, match="guidance_scale"):
            tiny_pipe("a", guidance_scale=float("nan"), steps=2, progress=False)
        assert calls == [] and seen[0][0] == "text-to-image"
        tiny_pipe("a", steps=2, seed=0, progress=False, output_type="latent")
        assert len(calls) == 2
    finally:
        hook.remove()


def test_the_api_and_a_check_before_loading_give_the_same_answers(tiny_facts, tiny_pipe):
    """What the CLI and the server check before loading is what the pipeline checks after."""
    bad = [dict(width=80), dict(width=0), dict(seed=1.5), dict(prompt=123), dict(steps=0), dict(eta=float("inf")),
           dict(sampler="euler"), dict(num_inference_steps=3, steps=4), dict(output_type="jpeg"), dict(bs=0)]
    for arguments in bad:
        arguments = {"prompt": "a", **arguments}
        with pytest.raises(UsageError) as before:
            check_generation("text-to-image", tiny_facts, **arguments)
        with pytest.raises(UsageError) as after:
            tiny_pipe(**arguments, progress=False)
        assert str(before.value) == str(after.value) and "\n" not in str(before.value)


def test_generate_takes_only_a_request_checked_for_its_task(tiny_pipe, tiny_facts):
    request = check_generation("img2img", tiny_facts, prompt="a", image=torch.zeros(1, 4, 16, 16))
    with pytest.raises(UsageError, match="checked for 'text-to-image'"):
        tiny_pipe.generate(request)
    with pytest.raises(UsageError, match="9-channel inpainting"):
        check_generation("inpainting", tiny_facts, prompt="a", image=None, mask=None)


def test_unknown_arguments_name_the_closest_known_one(tiny_facts):
    with pytest.raises(TypeError, match="no argument 'stepz'; did you mean 'steps'"):
        check_generation("text-to-image", tiny_facts, prompt="a", stepz=3)
    with pytest.raises(UsageError, match="img2img needs image"):
        check_generation("img2img", tiny_facts, prompt="a")


# ----------------------------------------------------------------------------------------------- estimates


def _facts(**changes):
    """The facts of the 2-level test components (size multiple 4), with ``changes``."""
    pipe = Kandinsky3Pipeline(*tiny_components())
    facts = ModelFacts.of_pipeline(pipe)
    return ModelFacts(**{**{name: getattr(facts, name) for name in facts.__dataclass_fields__}, **changes})


def test_activation_estimate_follows_the_documented_formula():
    from kandinsky3.models.movq import MoVQConfig
    from kandinsky3.models.unet_config import UNetConfig

    facts = _facts(unet_config=UNetConfig(), movq_config=MoVQConfig())  # the released configs
    load = budget.Workload(1024, 1024, unet_rows=2, decode_images=1, steps=50)
    need = budget.activation_bytes(facts, load)
    widths = 384 + 768 / 4 + 1536 / 16 + 3072 / 64  # Σ C_l / 4^l
    assert need["unet"] == int(2 * 128 * 128 * widths * budget.UNET_LIVE_MAPS * 4)
    assert need["movq"] == 1024 * 1024 * 256 * budget.MOVQ_LIVE_MAPS * 4  # 8 GiB: the full-width decoder, fp32
    tiled = budget.activation_bytes(_facts(unet_config=UNetConfig(), movq_config=MoVQConfig(), decode_tile=64), load)
    assert tiled["movq"] == 512 * 512 * 256 * budget.MOVQ_LIVE_MAPS * 4  # one 512 px tile, whatever the size


def test_a_size_over_the_free_memory_is_refused_with_the_largest_size_that_fits():
    facts = _facts()
    load = budget.Workload(1024, 512, unet_rows=2, decode_images=1, steps=3)
    free = max(budget.activation_bytes(facts, budget.Workload(400, 200, 2, 1, 3)).values()) + 1
    with pytest.raises(UsageError) as error:
        budget.check_memory(facts, load, free=lambda device: free)
    message = str(error.value)
    assert message.startswith("1024x512 needs about") and "for the U-Net step on cpu" in message
    assert "(2:1) that fits is 400x200" in message
    fits = budget.activation_bytes(facts, budget.Workload(400, 200, 2, 1, 3))
    bigger = budget.activation_bytes(facts, budget.Workload(404, 202, 2, 1, 3))
    assert max(fits.values()) <= free < max(bigger.values())
    with pytest.raises(UsageError, match="for the MoVQ decode on cpu .* --decode-tile"):
        budget.check_memory(facts, budget.Workload(1024, 512, 1, 1, 3), free=lambda device: free)
    with pytest.raises(UsageError, match="no size fits"):
        budget.check_memory(facts, load, free=lambda device: 1)


def test_a_huge_size_is_refused_before_any_network_runs(tiny_pipe):
    calls = []
    hook = tiny_pipe.unet.in_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(UsageError, match=r"100032x100032 needs about .* TiB .* free; the largest"):
            tiny_pipe("a", width=100032, height=100032, progress=False)
    finally:
        hook.remove()
    assert calls == []


def test_time_per_step_is_logged_for_sizes_far_above_the_native_one(tiny_facts, caplog):
    with caplog.at_level(logging.WARNING, logger="kandinsky3.pipelines.budget"):
        check_generation("text-to-image", tiny_facts, prompt="a", seed=0)  # native 128×128: nothing
        assert not caplog.records
        check_generation("text-to-image", tiny_facts, prompt="a", seed=0, width=512, height=384, steps=7)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "512x384 is 12× the pixels of the model's native 128x128: about" in record.getMessage()
    assert "per step on cpu" in record.getMessage() and "for 7 steps" in record.getMessage()


def test_step_time_estimate_counts_the_unet_flops():
    facts = _facts()
    flops = budget.unet_flops(facts.unet_config, 2, 16, 16)
    assert flops > 0 and budget.unet_flops(facts.unet_config, 4, 16, 16) == 2 * flops
    seconds = budget.step_seconds(facts, budget.Workload(32, 32, 2, 1, 1))  # latent 16×16 (factor 2)
    rate = budget.matmul_rate(torch.device("cpu"), torch.float32)
    assert math.isclose(seconds, flops / (budget.GEMM_EFFICIENCY * rate))
