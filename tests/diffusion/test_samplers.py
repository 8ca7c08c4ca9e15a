"""Samplers, CFG and x̂₀ transforms against diffusers schedulers and plain re-derivations (architecture §5.3–§5.8).

Parity tolerance: all comparisons run in fp32 on (2, 4, 8, 8) latents with |x| ≲ 3. The two sides evaluate the
same formulas in a different association order, so they agree to a few fp32 ulps per step (~1e-7 absolute);
1e-5 leaves room for 50 steps of accumulation while still catching any wrong coefficient (those show up at
≥ 1e-3).
"""

import functools
import math

import pytest
import torch

from kandinsky3.diffusion import (
    FLASH_TIMESTEPS,
    SAMPLER_TABLE,
    bind_per_call,
    cosine_alphas_cumprod,
    dpm_solver_timesteps,
    dynamic_threshold,
    get_sampler,
    guided_eps,
    hard_clip,
    leading_timesteps,
    make_cfg_denoiser,
    make_denoiser,
    original30_timesteps,
    original_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_flash,
    sample_original,
    sample_original30,
    trailing_timesteps,
)
from kandinsky3.diffusion.samplers import sample_dpmpp_2m_sde

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers' DPM

SHAPE = (2, 4, 8, 8)
TOL = 1e-5


AC = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod  # independent copy of ᾱ


def toy_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, deterministic, non-linear ε-model that is consistent with bounded data.

    x̂₀ = 1.3·tanh(√ᾱ_t·(0.9·x − 0.3·roll(x)) + 0.1·t/1000) is a squashed, channel-mixing version of the
    posterior mean for unit-Gaussian data (so |x̂₀| < 1.3 and clipping sometimes acts), and ε̂ is the noise that
    x̂₀ implies. A denoiser whose x̂₀ is unbounded (e.g. ε̂ = tanh(x)) makes x̂₀ ~ 10⁴ at t = 999 and every
    comparison meaningless in absolute terms.
    """
    assert t.dtype == torch.long and t.shape == (x.shape[0],)
    a = AC[t].view(-1, 1, 1, 1)
    x0 = 1.3 * torch.tanh(a.sqrt() * (0.9 * x - 0.3 * x.roll(1, dims=1)) + 0.1 * t.view(-1, 1, 1, 1) / 1000)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, x: torch.Tensor, generator=None, **step_kwargs) -> torch.Tensor:
    for t in scheduler.timesteps:
        eps = toy_denoiser(x, t.repeat(x.shape[0]))
        x = scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize("steps", [5, 25])
def test_ddpm_matches_diffusers_kandinsky_config_with_same_noise(steps):
    ref = diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, steps_offset=1, timestep_spacing="leading"
    )
    ref.set_timesteps(steps)
    x = start_noise()
    expected = run_diffusers(ref, x, generator=torch.Generator().manual_seed(7))
    got = sample_ddpm(toy_denoiser, x, leading_timesteps(steps), cosine_alphas_cumprod(),
                      generator=torch.Generator().manual_seed(7))
    # diffusers adds 1e-10·z on its last step (variance clamped to 1e-20); we add nothing there.
    assert max_abs(got, expected) <= TOL


@pytest.mark.parametrize(
    "eta, set_alpha_to_one, spacing, offset",
    [(0.0, True, "leading", 0), (0.0, False, "leading", 1), (0.5, True, "leading", 0), (1.0, False, "leading", 1),
     (0.0, True, "trailing", 0), (0.7, False, "trailing", 0)],
)
def test_ddim_matches_diffusers(eta, set_alpha_to_one, spacing, offset):
    steps = 10
    ref = diffusers.DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=spacing, steps_offset=offset,
    )
    ref.set_timesteps(steps)
    ts = leading_timesteps(steps, offset=offset) if spacing == "leading" else trailing_timesteps(steps)
    assert ts == ref.timesteps.tolist()
    x = start_noise(1)
    expected = run_diffusers(ref, x, generator=torch.Generator().manual_seed(3), eta=eta)
    got = sample_ddim(toy_denoiser, x, ts, cosine_alphas_cumprod(), eta=eta, set_alpha_to_one=set_alpha_to_one,
                      generator=torch.Generator().manual_seed(3))
    assert max_abs(got, expected) <= TOL


def test_ddim_with_hard_clip_matches_diffusers_clip_sample_with_clipped_model_output():
    ref = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, set_alpha_to_one=False,
                                  steps_offset=1)
    ref.set_timesteps(10)
    x = start_noise(1) * 2
    expected = run_diffusers(ref, x, generator=torch.Generator().manual_seed(3), eta=0.3,
                             use_clipped_model_output=True)
    got = sample_ddim(toy_denoiser, x, leading_timesteps(10), cosine_alphas_cumprod(), eta=0.3,
                      set_alpha_to_one=False, x0_transform=hard_clip, generator=torch.Generator().manual_seed(3))
    assert max_abs(got, expected) <= TOL


def test_ddpm_without_transform_matches_diffusers_without_clip_sample():
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, steps_offset=1)
    ref.set_timesteps(10)
    x = start_noise(1) * 2
    expected = run_diffusers(ref, x, generator=torch.Generator().manual_seed(3))
    got = sample_ddpm(toy_denoiser, x, leading_timesteps(10), cosine_alphas_cumprod(), x0_transform=None,
                      generator=torch.Generator().manual_seed(3))
    assert max_abs(got, expected) <= TOL


@pytest.mark.parametrize(
    "steps, final_sigmas_type, euler_at_final",
    [(10, "zero", False), (20, "zero", False), (10, "sigma_min", False), (20, "sigma_min", False),
     (20, "sigma_min", True), (1, "zero", False), (2, "zero", False)],
)
def test_dpmpp_2m_matches_diffusers(steps, final_sigmas_type, euler_at_final):
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="squaredcos_cap_v2", algorithm_type="dpmsolver++", solver_order=2,
        final_sigmas_type=final_sigmas_type, euler_at_final=euler_at_final,
    )
    ref.set_timesteps(steps)
    x = start_noise(2)
    expected = run_diffusers(ref, x)
    got = sample_dpmpp_2m(toy_denoiser, x, dpm_solver_timesteps(steps), cosine_alphas_cumprod(),
                          final_sigmas_type=final_sigmas_type, euler_at_final=euler_at_final)
    assert torch.isfinite(got).all()
    assert max_abs(got, expected) <= TOL


@pytest.mark.parametrize(
    "steps, final_sigmas_type, euler_at_final, lower_order_final",
    [(5, "zero", False, True), (10, "zero", False, True), (25, "zero", False, True), (1, "zero", False, True),
     (5, "sigma_min", False, True), (10, "sigma_min", False, False), (25, "sigma_min", False, True),
     (25, "sigma_min", True, True)],
)
def test_dpmpp_2m_sde_matches_diffusers_with_same_noise(steps, final_sigmas_type, euler_at_final, lower_order_final):
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="squaredcos_cap_v2", algorithm_type="sde-dpmsolver++", solver_order=2,
        final_sigmas_type=final_sigmas_type, euler_at_final=euler_at_final, lower_order_final=lower_order_final,
    )
    ref.set_timesteps(steps)
    x = start_noise(2)
    expected = run_diffusers(ref, x, generator=torch.Generator().manual_seed(5))
    got = sample_dpmpp_2m_sde(toy_denoiser, x, dpm_solver_timesteps(steps), cosine_alphas_cumprod(),
                              final_sigmas_type=final_sigmas_type, euler_at_final=euler_at_final,
                              lower_order_final=lower_order_final, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(got).all()
    assert max_abs(got, expected) <= TOL


def test_dpmpp_2m_sde_matches_diffusers_with_a_generator_per_sample():
    ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", algorithm_type="sde-dpmsolver++",
                                                final_sigmas_type="sigma_min")
    ref.set_timesteps(10)
    x = start_noise(3)
    expected = run_diffusers(ref, x, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    got = sample_dpmpp_2m_sde(toy_denoiser, x, dpm_solver_timesteps(10), cosine_alphas_cumprod(),
                              final_sigmas_type="sigma_min",
                              generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert max_abs(got, expected) <= TOL


def test_dpmpp_2m_sde_defaults_to_the_dpm_solver_timesteps():
    entry = get_sampler("dpmpp_2m_sde")
    assert entry.default_steps == 25 and entry.function is sample_dpmpp_2m_sde
    assert entry.timesteps() == dpm_solver_timesteps(25) == get_sampler("dpmpp_2m").timesteps()
    assert entry.timesteps(10) == dpm_solver_timesteps(10)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_dpmpp_2m_with_zero_final_sigma_returns_last_x0(name):
    seen = []
    out = get_sampler(name).function(toy_denoiser, start_noise(), dpm_solver_timesteps(6), cosine_alphas_cumprod(),
                                     generator=torch.Generator().manual_seed(0),
                                     callback=lambda info: seen.append(info["x0"]))
    assert torch.equal(out, seen[-1])


# ------------------------------------------------------------------------------------ the Kandinsky 3.1 sampler


def reference_original_sampler(x, steps, eta, percentile, generator):
    """architecture §5.5 written out plainly, with ᾱ taken from diffusers (an independent source of the schedule)."""
    ac = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    times = list(range(999, 0, -1000 // steps))  # the original's expression, read literally
    for t, t_prev in zip(times, times[1:] + [0]):
        a, a_prev = ac[t], ac[t_prev]
        eps = toy_denoiser(x, torch.full((x.shape[0],), t))
        x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        q = torch.quantile(x0.abs().reshape(x0.shape[0], -1), percentile, dim=1).clamp(min=1).view(-1, 1, 1, 1)
        x0 = torch.clip(x0, -q, q) / q
        eps = (x - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
        sigma = torch.sqrt(eta * (1 - a / a_prev) * (1 - a_prev) / (1 - a))
        mean = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev - sigma**2) * eps
        x = mean + sigma * torch.randn(x.shape, generator=generator) if t_prev != 0 else mean
    return x


@pytest.mark.parametrize("steps, eta", [(10, 1.0), (10, 0.25), (50, 1.0), (7, 0.0)])
def test_original_sampler_matches_plain_rederivation(steps, eta):
    x = start_noise(4) * 1.5
    expected = reference_original_sampler(x, steps, eta, 0.99, torch.Generator().manual_seed(11))
    got = sample_original(toy_denoiser, x, original_timesteps(steps), cosine_alphas_cumprod(), eta=eta,
                          x0_transform=functools.partial(dynamic_threshold, percentile=0.99),
                          generator=torch.Generator().manual_seed(11))
    assert max_abs(got, expected) <= TOL


def test_original_step_equals_diffusers_ddpm_posterior_step_for_the_same_jump():
    # architecture §5.5: with identical t → t_prev, eta = 1 and hard clipping, one step is diffusers' strided DDPM step.
    t, t_prev = 979, 959
    x = start_noise(5)
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    ref.set_timesteps(timesteps=[t, t_prev])
    expected = ref.step(toy_denoiser(x, torch.full((2,), t)), t, x, generator=torch.Generator().manual_seed(9))
    after_first = []
    sample_original(toy_denoiser, x, [t, t_prev], cosine_alphas_cumprod(), eta=1.0, x0_transform=hard_clip,
                    generator=torch.Generator().manual_seed(9),
                    callback=lambda info: after_first.append(info["x"]) if info["step"] == 1 else None)
    assert max_abs(after_first[0], expected.prev_sample) <= 1e-5


def test_original_last_step_targets_alpha_bar_0_and_adds_no_noise():
    # One step 999 → 0 with eta = 1: mean = √ᾱ_0 x̂₀ + √(1 − ᾱ_0 − σ²) ε̂ with σ² from ᾱ_0, and no noise.
    x = start_noise(6)
    ac = cosine_alphas_cumprod()
    got = sample_original(toy_denoiser, x, [19], ac, eta=1.0, generator=torch.Generator().manual_seed(0))
    a, a0 = ac[19].double(), ac[0].double()
    eps = toy_denoiser(x, torch.full((2,), 19)).double()
    x0 = ((x.double() - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
    var = (1 - a / a0) * (1 - a0) / (1 - a)
    expected = a0.sqrt() * x0 + (1 - a0 - var).sqrt() * eps
    assert max_abs(got.double(), expected) <= 1e-5
    assert torch.equal(got, sample_original(toy_denoiser, x, [19], ac, generator=torch.Generator().manual_seed(1)))


def test_original_with_eta_0_and_no_transform_is_ddim_to_alpha_bar_0():
    x, ts, ac = start_noise(7), original_timesteps(20), cosine_alphas_cumprod()
    got = sample_original(toy_denoiser, x, ts, ac, eta=0.0, x0_transform=None)
    expected = sample_ddim(toy_denoiser, x, ts, ac, eta=0.0, set_alpha_to_one=False)
    assert max_abs(got, expected) <= 1e-6


def test_original_single_jump_999_to_0_stays_finite():
    out = sample_original(toy_denoiser, start_noise(), original_timesteps(1), cosine_alphas_cumprod())
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------ Flash


def test_flash_renoises_at_every_step_including_the_first():
    x, ac = start_noise(8), cosine_alphas_cumprod()
    calls = []

    def denoiser(x_t, t):
        calls.append((x_t.clone(), t.clone()))
        return toy_denoiser(x_t, t)

    got = sample_flash(denoiser, x, FLASH_TIMESTEPS, ac, generator=torch.Generator().manual_seed(5))
    g, img = torch.Generator().manual_seed(5), x
    for i, t in enumerate(FLASH_TIMESTEPS):
        a = ac[t]
        x_t = a.sqrt() * img + (1 - a).sqrt() * torch.randn(SHAPE, generator=g)
        assert torch.equal(calls[i][1], torch.full((2,), t)) and torch.allclose(calls[i][0], x_t, atol=1e-6)
        img = (x_t - (1 - a).sqrt() * toy_denoiser(x_t, torch.full((2,), t))) / a.sqrt()
    assert len(calls) == 4 and not torch.allclose(calls[0][0], x)
    assert max_abs(got, img) <= TOL


def test_list_of_generators_draws_per_sample():
    x, ac = start_noise(9), cosine_alphas_cumprod()
    both = sample_flash(toy_denoiser, x, FLASH_TIMESTEPS, ac,
                        generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    first = sample_flash(toy_denoiser, x[:1], FLASH_TIMESTEPS, ac, generator=torch.Generator().manual_seed(1))
    second = sample_flash(toy_denoiser, x[1:], FLASH_TIMESTEPS, ac, generator=torch.Generator().manual_seed(2))
    assert torch.equal(both, torch.cat([first, second]))


# ------------------------------------------------------------------------------------ determinism and hooks


def _short_timesteps(name):
    return get_sampler(name).timesteps(4 if name == "flash" else 6)


def _run(name, x, generator, **kwargs):
    return get_sampler(name).function(toy_denoiser, x, _short_timesteps(name), cosine_alphas_cumprod(),
                                      generator=generator, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs",
    [("original", {}), ("original30", {}), ("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpmpp_2m_sde", {}),
     ("flash", {})],
)
def test_sampler_is_deterministic_given_generator_and_leaves_global_rng_alone(name, kwargs):
    x = start_noise()
    state = torch.get_rng_state()
    a = _run(name, x, torch.Generator().manual_seed(0), **kwargs)
    b = _run(name, x, torch.Generator().manual_seed(0), **kwargs)
    c = _run(name, x, torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_deterministic_samplers_draw_no_noise():
    x, state = start_noise(), torch.get_rng_state()
    _run("ddim", x, None, eta=0.0)
    _run("dpmpp_2m", x, None)
    _run("original", x, None, eta=0.0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", [entry.name for entry in SAMPLER_TABLE])
def test_callback_sees_every_step_and_progress_wraps_the_loop(name):
    infos, wrapped = [], []

    def progress(it):
        wrapped.append(len(it))
        return it

    x = start_noise()
    out = _run(name, x, torch.Generator().manual_seed(0), callback=infos.append, progress=progress)
    ts = _short_timesteps(name)
    assert wrapped == [len(ts)] and [i["step"] for i in infos] == list(range(len(ts)))
    assert [i["t"] for i in infos] == ts and set(infos[0]) == {"step", "t", "x", "x0"}
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m_sde"])
def test_sampler_accepts_tensor_timesteps_and_runs_in_x_dtype(name):
    x = start_noise().double()
    out = get_sampler(name).function(toy_denoiser, x, torch.tensor(get_sampler(name).timesteps(5)),
                                     cosine_alphas_cumprod(), generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_samplers_reject_bad_arguments():
    x, ac = start_noise(), cosine_alphas_cumprod()
    with pytest.raises(ValueError, match="strictly descending"):
        sample_ddpm(toy_denoiser, x, [1, 500], ac)
    with pytest.raises(ValueError, match="eta must be"):
        sample_original(toy_denoiser, x, [999], ac, eta=-1.0)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        sample_dpmpp_2m(toy_denoiser, x, [999], ac, final_sigmas_type="one")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        sample_dpmpp_2m_sde(toy_denoiser, x, [999], ac, final_sigmas_type="one")
    with pytest.raises(ValueError, match="generators for a batch"):
        sample_flash(toy_denoiser, x, FLASH_TIMESTEPS, ac, generator=[torch.Generator()])


# ---------------------------------------------------------------------------------------------- guidance / CFG


def test_guided_eps_formula():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(guided_eps(c, u, 3.0), 4 * c - 3 * u)
    torch.testing.assert_close(guided_eps(c, u, 3.0), u + 4 * (c - u))
    assert torch.equal(guided_eps(c, u, 0.0), c)


class RecordingNet:
    """A fake network: ε = x[:, :4]·0 + mean(context) per sample; records every call's shapes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, mask):
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(), "mask": mask.clone()})
        return x[:, :4] * 0 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def _conds(batch=2, length=5, dim=3):
    cond = (torch.full((batch, length, dim), 2.0), torch.ones(batch, length, dtype=torch.bool))
    uncond = (torch.full((batch, length, dim), -1.0), torch.zeros(batch, length, dtype=torch.bool))
    return cond, uncond


def test_cfg_with_w_zero_makes_one_call_with_batch_b():
    net, (cond, uncond) = RecordingNet(), _conds()
    eps = make_cfg_denoiser(bind_per_call(net), cond, uncond, 0.0)(start_noise(), torch.full((2,), 500))
    assert len(net.calls) == 1 and net.calls[0]["x"].shape[0] == 2 and torch.equal(net.calls[0]["context"], cond[0])
    assert torch.equal(eps, torch.full(SHAPE, 2.0))


def test_cfg_makes_one_call_with_batch_2b_cond_first_and_combines():
    net, (cond, uncond) = RecordingNet(), _conds()
    x, t = start_noise(), torch.tensor([500, 400])
    eps = make_cfg_denoiser(bind_per_call(net), cond, uncond, 3.0)(x, t)
    assert len(net.calls) == 1
    call = net.calls[0]
    assert call["x"].shape[0] == 4 and torch.equal(call["x"], torch.cat([x, x]))
    assert torch.equal(call["t"], torch.tensor([500, 400, 500, 400]))
    assert torch.equal(call["context"], torch.cat([cond[0], uncond[0]]))  # cond FIRST
    assert torch.equal(call["mask"], torch.cat([cond[1], uncond[1]]))
    torch.testing.assert_close(eps, torch.full(SHAPE, 4 * 2.0 - 3 * -1.0))


def test_cfg_extra_channels_are_concatenated_for_both_branches():
    net, (cond, uncond) = RecordingNet(), _conds()
    x, extra = start_noise(), torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    make_cfg_denoiser(bind_per_call(net), cond, uncond, 4.0, extra_channels=extra)(x, torch.full((2,), 10))
    x_in = net.calls[0]["x"]
    assert x_in.shape == (4, 9, 8, 8)
    assert torch.equal(x_in[:, :4], torch.cat([x, x])) and torch.equal(x_in[:, 4:], torch.cat([extra, extra]))
    make_denoiser(bind_per_call(net), cond, extra_channels=extra)(x, torch.full((2,), 10))
    assert torch.equal(net.calls[1]["x"], torch.cat([x, extra], dim=1))


def test_cfg_rejects_missing_or_mismatched_uncond_and_wrong_batch():
    net, (cond, uncond) = RecordingNet(), _conds()
    with pytest.raises(ValueError, match="needs an unconditional"):
        make_cfg_denoiser(bind_per_call(net), cond, None, 3.0)
    with pytest.raises(ValueError, match="must equal cond shapes"):
        make_cfg_denoiser(bind_per_call(net), cond, (uncond[0][:, :3], uncond[1][:, :3]), 3.0)
    with pytest.raises(ValueError, match="extra_channels"):
        make_cfg_denoiser(bind_per_call(net), cond, uncond, 3.0, extra_channels=torch.zeros(3, 5, 8, 8))
    with pytest.raises(ValueError, match="expected x"):
        make_cfg_denoiser(bind_per_call(net), cond, uncond, 3.0)(torch.zeros(3, 4, 8, 8), torch.zeros(3, dtype=torch.long))


def test_cfg_denoiser_drives_a_sampler_end_to_end():
    cond, uncond = _conds()
    net = lambda x, t, c, m: toy_denoiser(x, t) + c.mean(dim=(1, 2)).view(-1, 1, 1, 1) * 0.1  # noqa: E731
    den = make_cfg_denoiser(bind_per_call(net), cond, uncond, 3.0)
    out = sample_original(den, start_noise(), original_timesteps(5), cosine_alphas_cumprod(),
                          generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


# -------------------------------------------------------------------------------------- dynamic thresholding


def test_dynamic_threshold_output_in_unit_range():
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 5
    out = dynamic_threshold(x0, 0.99)
    assert out.abs().max() <= 1.0 and out.shape == x0.shape


def test_dynamic_threshold_is_identity_when_inside_unit_range():
    x0 = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    assert torch.equal(dynamic_threshold(x0, 0.99), x0)


def test_dynamic_threshold_hard_clips_when_quantile_below_one():
    x0 = torch.full((1, 100), 0.5)
    x0[0, 0] = 3.0  # the 50th percentile is 0.5 → q = max(0.5, 1) = 1: plain clipping
    assert torch.equal(dynamic_threshold(x0, 0.5), x0.clamp(-1, 1))


def test_dynamic_threshold_uses_per_sample_percentile():
    ramp = torch.linspace(0, 10, 101)  # the p-quantile of |ramp| is 10·p exactly (linear interpolation)
    x0 = torch.stack([ramp, -2 * ramp])  # (2, 101): two samples at different scales
    out = dynamic_threshold(x0, 0.5)
    torch.testing.assert_close(out[0], ramp.clamp(max=5.0) / 5.0)
    torch.testing.assert_close(out[1], (-2 * ramp).clamp(min=-10.0) / 10.0)


def test_dynamic_threshold_supports_half_precision_and_rejects_bad_percentile():
    x0 = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    out = dynamic_threshold(x0, 0.95)
    assert out.dtype == torch.bfloat16 and out.float().abs().max() <= 1.0
    with pytest.raises(ValueError, match="percentile"):
        dynamic_threshold(x0, 99.0)


def test_hard_clip():
    assert torch.equal(hard_clip(torch.tensor([-3.0, 0.2, 2.0])), torch.tensor([-1.0, 0.2, 1.0]))
    assert math.isclose(hard_clip(torch.tensor([5.0]), 2.0).item(), 2.0)


# ------------------------------------------------------------------------------------------- the 3.0 sampler


def test_original30_grid_has_the_spec_noise_levels_and_label_lag():
    """architecture §5.6: on the 50-point grid, index i has the 1000-step ᾱ of 20·i + 19, not of its label 20·i."""
    grid, full = cosine_alphas_cumprod(50), cosine_alphas_cumprod()
    assert original30_timesteps(50)[:3] == [980, 960, 940] and original30_timesteps(50)[-1] == 0
    assert grid[0].item() == pytest.approx(0.998252, abs=1e-6) and grid[24].item() == pytest.approx(0.493844, abs=1e-6)
    assert grid[0].item() == pytest.approx(full[19].item(), rel=1e-5)
    assert grid[24].item() == pytest.approx(full[499].item(), rel=1e-5)
    assert grid[-1].item() == pytest.approx(9.7e-7, rel=0.01)


@pytest.mark.parametrize("steps", [5, 50])
def test_original30_is_ddpm_on_an_s_step_cosine_schedule_told_scaled_labels(steps):
    """Oracle: diffusers' DDPMScheduler trained for S steps (same cosine betas), posterior variance, hard clip,
    stepping through every grid index, with the U-Net told 1000 // S times the index."""
    reference = diffusers.DDPMScheduler(num_train_timesteps=steps, beta_schedule="squaredcos_cap_v2",
                                        clip_sample=True, variance_type="fixed_small")
    reference.set_timesteps(steps)
    scale, x = 1000 // steps, start_noise()
    generator = torch.Generator().manual_seed(7)
    for t in reference.timesteps:
        eps = toy_denoiser(x, (t * scale).repeat(x.shape[0]))
        x = reference.step(eps, t, x, generator=generator).prev_sample
    got = sample_original30(toy_denoiser, start_noise(), original30_timesteps(steps), cosine_alphas_cumprod(),
                            generator=torch.Generator().manual_seed(7))
    # fp32 rounding of the coefficient routes (the original's β_i vs diffusers' 1 − ᾱ_t/ᾱ_{t−1}) adds up over 50
    # noisy steps: measured 3.2e-5, and the same sampler in fp64 is 1.7e-5 from diffusers' fp32 result.
    assert max_abs(got, x) <= (TOL if steps <= 10 else 1e-4)
    assert max_abs(got, sample_original30(toy_denoiser, start_noise(), original30_timesteps(steps), None,
                                          generator=torch.Generator().manual_seed(8))) > 0.01  # noise is drawn


def test_original30_refuses_other_timestep_lists():
    with pytest.raises(ValueError, match="original30_timesteps"):
        sample_original30(toy_denoiser, start_noise(), original_timesteps(50), cosine_alphas_cumprod())
