"""The sampler table (kandinsky3/diffusion/registry.py): each entry agrees with its sampler function, and the
choices, defaults, refusals and scheduler-config translation the pipelines and the CLI use come from it."""

import functools
import inspect

import pytest
import torch

from kandinsky3.diffusion import (
    FLASH_TIMESTEPS,
    SAMPLER_TABLE,
    check_scheduler_config,
    check_timesteps,
    cosine_alphas_cumprod,
    dpm_solver_timesteps,
    dynamic_threshold,
    get_sampler,
    hard_clip,
    leading_timesteps,
    linspace_timesteps,
    original30_timesteps,
    original_timesteps,
    sampler_names,
    sampler_setup,
    trailing_timesteps,
)
from kandinsky3.diffusion import samplers as samplers_module

NAMES = [entry.name for entry in SAMPLER_TABLE]
# kandinsky-community/kandinsky-3 scheduler_config.json (architecture §5.8), the keys the translation reads.
COMMUNITY_CONFIG = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon", "clip_sample": True, "timestep_spacing": "leading", "steps_offset": 1,
    "set_alpha_to_one": False,
}


def bounded_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The ε̂ whose x̂₀ is tanh(x): bounded, so every sampler stays finite at t = 999."""
    a = cosine_alphas_cumprod()[t].view(-1, 1, 1, 1)
    return (x - a.sqrt() * torch.tanh(x)) / (1 - a).sqrt()


def run_entry(name: str, seed: int, **options) -> torch.Tensor:
    entry = get_sampler(name)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = len(FLASH_TIMESTEPS) if name == "flash" else 5
    return entry.function(bounded_denoiser, x, entry.timesteps(steps), cosine_alphas_cumprod(),
                          generator=torch.Generator().manual_seed(seed), **options)


# ------------------------------------------------------------------------------ entries agree with the functions


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_flag_says_whether_the_generator_reaches_the_result(name):
    assert (not torch.equal(run_entry(name, 0), run_entry(name, 1))) == get_sampler(name).stochastic


@pytest.mark.parametrize("name", NAMES)
def test_eta_default_is_the_functions_own_and_only_eta_samplers_take_it(name):
    entry = get_sampler(name)
    parameters = inspect.signature(entry.function).parameters
    if entry.eta is None:
        assert "eta" not in parameters
    else:
        assert parameters["eta"].default == entry.eta


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_computes_x0_through_the_shared_helper(name, monkeypatch):
    calls, shared = [], samplers_module.x0_from_eps

    def counting(*args):
        calls.append(1)
        return shared(*args)

    monkeypatch.setattr(samplers_module, "x0_from_eps", counting)
    steps = []
    entry = get_sampler(name)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    entry.function(bounded_denoiser, x, entry.timesteps(len(FLASH_TIMESTEPS) if name == "flash" else 3),
                   cosine_alphas_cumprod(), generator=torch.Generator().manual_seed(0), callback=steps.append)
    assert len(calls) == len(steps) > 0  # once per step: no sampler writes x̂₀ = (x − σ ε̂)/α itself


def test_default_timesteps_per_sampler():
    expected = {
        "original": original_timesteps(50), "original30": original30_timesteps(50),
        "ddpm": leading_timesteps(25, offset=1), "ddim": leading_timesteps(50, offset=1),
        "dpmpp_2m": dpm_solver_timesteps(25), "dpmpp_2m_sde": dpm_solver_timesteps(25),
        "flash": list(FLASH_TIMESTEPS),
    }
    assert {entry.name: entry.timesteps() for entry in SAMPLER_TABLE} == expected
    assert get_sampler("ddpm").timesteps(10)[0] == 901
    for entry in SAMPLER_TABLE:
        assert check_timesteps(entry.timesteps(), 1000) and len(entry.timesteps()) <= entry.default_steps


def test_flash_runs_only_its_four_timesteps():
    with pytest.raises(ValueError, match="exactly the 4 timesteps"):
        get_sampler("flash").timesteps(50)


# --------------------------------------------------------------------------------------- names and refusals


def test_sampler_names_per_weights_and_task():
    assert sampler_names() == ("original", "original30", "ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
    assert sampler_names(flash_weights=True) == ("flash",)
    assert sampler_names(for_img2img=True) == ("original", "ddpm", "ddim")


def test_unknown_sampler_error_names_the_choices():
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose from original, original30, ddpm"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_setup("euler", None, eta=None, threshold=None, scheduler_config=None)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("dpmpp_2m", dict(eta=0.5), "eta applies to the 'original' and 'ddim' samplers, not 'dpmpp_2m'"),
        ("original30", dict(img2img=True), "img2img supports the 'original', 'ddpm' and 'ddim' samplers"),
        ("dpmpp_2m_sde", dict(img2img=True), "img2img supports the 'original', 'ddpm' and 'ddim' samplers"),
        ("flash", {}, "'flash' sampler needs the Kandinsky Flash weights"),
        ("ddim", dict(flash_weights=True), "Kandinsky Flash weights run only 'flash', not 'ddim'"),
    ],
)
def test_refusals_name_the_samplers_that_would_work(name, options, message):
    eta = options.pop("eta", None)
    with pytest.raises(ValueError, match=message):
        sampler_setup(name, None, eta=eta, threshold=0.99, scheduler_config=None, **options)


def test_cli_offers_exactly_the_base_weights_samplers():
    from kandinsky3.cli import build_parser

    parser = build_parser()
    for name in sampler_names():
        assert parser.parse_args(["generate", "a", "--sampler", name]).sampler == name
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "a", "--sampler", "flash"])


# ------------------------------------------------------------------------- x̂₀ treatment and scheduler configs


def _transform(name, threshold, scheduler_config):
    return sampler_setup(name, None, eta=None, threshold=threshold, scheduler_config=scheduler_config,
                         flash_weights=name == "flash")[2].get("x0_transform")


@pytest.mark.parametrize("name", NAMES)
def test_original_layout_weights_threshold_every_sampler_but_flash(name):
    transform = _transform(name, 0.99, None)
    if name == "flash":
        assert transform is None
    else:
        assert isinstance(transform, functools.partial) and transform.func is dynamic_threshold
        assert transform.keywords == {"percentile": 0.99}
        assert _transform(name, None, None) is hard_clip  # no percentile: the original's hard clip


def test_diffusers_layout_weights_follow_their_scheduler_config():
    assert _transform("original", 0.99, COMMUNITY_CONFIG).keywords == {"percentile": 0.99}  # always Kandinsky's
    assert _transform("ddpm", 0.99, COMMUNITY_CONFIG) is hard_clip  # clip_sample=True
    assert _transform("ddim", 0.99, {**COMMUNITY_CONFIG, "clip_sample": False}) is None
    assert _transform("dpmpp_2m", 0.99, COMMUNITY_CONFIG) is None  # the config is not a DPM-Solver config


def test_community_scheduler_config_sets_ddpm_and_ddim_timesteps_and_options():
    fn, timesteps, kwargs = sampler_setup("ddim", None, eta=0.0, threshold=0.99, scheduler_config=COMMUNITY_CONFIG)
    assert fn is get_sampler("ddim").function and timesteps == leading_timesteps(50, offset=1)
    assert kwargs == {"eta": 0.0, "x0_transform": hard_clip, "set_alpha_to_one": False, "recompute_eps": False}
    _, timesteps, kwargs = sampler_setup("ddpm", 10, eta=None, threshold=None, scheduler_config=COMMUNITY_CONFIG)
    assert timesteps == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1] and kwargs == {"x0_transform": hard_clip}
    for spacing, builder in (("trailing", trailing_timesteps), ("linspace", linspace_timesteps)):
        config = {**COMMUNITY_CONFIG, "timestep_spacing": spacing}
        assert sampler_setup("ddpm", 10, eta=None, threshold=None, scheduler_config=config)[1] == builder(10)
    # samplers without a scheduler translation keep their own timesteps
    assert sampler_setup("original", 10, eta=None, threshold=None, scheduler_config=COMMUNITY_CONFIG)[1] == (
        original_timesteps(10))


@pytest.mark.parametrize(
    "key, value",
    [("prediction_type", "v_prediction"), ("beta_schedule", "linear"), ("num_train_timesteps", 500),
     ("timestep_spacing", "uniform")],
)
def test_scheduler_configs_kandinsky_was_not_trained_for_are_refused(key, value):
    check_scheduler_config(COMMUNITY_CONFIG)
    check_scheduler_config(None)
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        check_scheduler_config({**COMMUNITY_CONFIG, key: value})
