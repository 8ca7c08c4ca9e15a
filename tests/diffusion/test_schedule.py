"""Schedule values, forward-process helpers and timestep lists (architecture §5.1, §5.2, §5.5, §5.7, §5.8;
practice §6.6)."""

import math

import pytest
import torch

from kandinsky3.diffusion import (
    FLASH_TIMESTEPS,
    check_timesteps,
    cosine_alphas_cumprod,
    cosine_betas,
    dpm_solver_timesteps,
    eps_from_x0,
    img2img_timesteps,
    leading_timesteps,
    linspace_timesteps,
    original_timesteps,
    predict_eps,
    predict_x0,
    previous_timesteps,
    q_sample,
    trailing_timesteps,
    x0_from_eps,
)

diffusers = pytest.importorskip("diffusers")


# ---------------------------------------------------------------------------------------------- schedule values


def test_alphas_cumprod_bit_identical_to_diffusers_squaredcos_cap_v2():
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ac, betas = cosine_alphas_cumprod(), cosine_betas()
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert torch.equal(betas, ref.betas)
    assert torch.equal(ac, ref.alphas_cumprod)


# Rows of the architecture §5.1 table: t, then (printed value, significant digits printed) for β_t, ᾱ_t, √ᾱ_t, SNR.
SCHEDULE_TABLE = [
    (0, (4.12842e-5, 6), (0.999959, 6), (0.999979, 6), (2.42e4, 3)),
    (19, (1.33634e-4, 6), (0.998252, 6), (0.999126, 6), (571, 3)),
    (229, (1.20848e-3, 6), (0.868774, 6), (0.932080, 6), (6.62, 3)),
    (499, (3.14589e-3, 6), (0.493843, 6), (0.702740, 6), (0.976, 3)),
    (729, (6.92643e-3, 6), (0.166853, 6), (0.408476, 6), (0.200, 3)),
    (979, (9.29404e-2, 6), (9.71193e-4, 6), (0.031164, 5), (9.72e-4, 3)),
    (999, (0.999, 3), (2.42873e-9, 6), (4.93e-5, 3), (2.4e-9, 2)),
]


def _assert_rounds_to(value: float, printed: float, sig: int) -> None:
    # A value printed with `sig` significant digits lies within half a unit of its last digit.
    unit = 10 ** (math.floor(math.log10(abs(printed))) - sig + 1)
    assert abs(value - printed) <= 0.5 * unit * (1 + 1e-9), (value, printed, sig)


@pytest.mark.parametrize("t, beta, ac, sqrt_ac, snr", SCHEDULE_TABLE)
def test_schedule_matches_the_architecture_table(t, beta, ac, sqrt_ac, snr):
    b, a = cosine_betas()[t].item(), cosine_alphas_cumprod()[t].item()
    _assert_rounds_to(b, *beta)
    _assert_rounds_to(a, *ac)
    _assert_rounds_to(math.sqrt(a), *sqrt_ac)
    _assert_rounds_to(a / (1 - a), *snr)


def test_beta_is_capped_at_0_999_only_at_the_end():
    b = cosine_betas()
    assert b[-1].item() == pytest.approx(0.999) and (b[:-1] < 0.999).all()


# ------------------------------------------------------------------------------------------ forward process


def test_q_sample_predict_x0_predict_eps_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 979])
    ac = cosine_alphas_cumprod()
    x_t = q_sample(x0, eps, t, ac)
    a = ac[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(predict_x0(x_t, eps, t, ac), x0, atol=2e-4, rtol=0)  # 1/√ᾱ_979 ≈ 32 amplifies ulps
    torch.testing.assert_close(predict_eps(x_t, x0, t, ac), eps, atol=2e-4, rtol=0)  # 1/√(1−ᾱ_0) ≈ 156 likewise


def test_x0_from_eps_and_eps_from_x0_are_the_two_forms_of_the_forward_process():
    """x_t = α·x₀ + σ·ε solved for x₀ and for ε, with the coefficients given (fp64: exact up to rounding)."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 2, 4, 4, 4, generator=g, dtype=torch.float64)  # two (2, 4, 4, 4) tensors
    alpha, sigma = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, alpha, sigma), eps, atol=1e-12, rtol=0)
    t, ac = torch.tensor([3, 700]), cosine_alphas_cumprod()
    a = ac[t].view(-1, 1, 1, 1)
    assert torch.equal(predict_x0(x_t.float(), eps.float(), t, ac),
                       x0_from_eps(x_t.float(), eps.float(), a.sqrt(), (1 - a).sqrt()))


def test_q_sample_matches_diffusers_add_noise():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([241, 961])
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").add_noise(x0, eps, t)
    assert torch.equal(q_sample(x0, eps, t, cosine_alphas_cumprod()), ref)


def test_forward_helpers_reject_wrong_t_shape():
    x = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"\(B,\) tensor"):
        q_sample(x, x, torch.tensor([1, 2, 3]), cosine_alphas_cumprod())


# ------------------------------------------------------------------------------------------ timestep lists


def test_original_timesteps_50_steps():
    ts = original_timesteps(50)
    assert ts[:3] == [999, 979, 959] and ts[-1] == 19 and len(ts) == 50
    assert previous_timesteps(ts) == ts[1:] + [0]


def test_original_timesteps_30_and_25_steps():
    ts30, ts25 = original_timesteps(30), original_timesteps(25)
    assert len(ts30) == 30 and ts30[1] == 999 - 34 and ts30[-1] == 13
    assert len(ts25) == 25 and ts25[:2] == [999, 959] and ts25[-1] == 39


@pytest.mark.parametrize("steps, runs", [(37, 36), (64, 63), (75, 72), (128, 125), (1000, 999), (36, 36), (40, 40)])
def test_original_timesteps_count_is_never_larger_than_steps(steps, runs):
    assert len(original_timesteps(steps)) == runs


def test_original_step_count_formula_over_all_steps():
    for steps in range(1, 1001):
        stride = -(-1000 // steps)
        n = len(original_timesteps(steps))
        assert n == -(-999 // stride) and n <= steps
        # architecture §5.5: equal for steps ≤ 36 and for divisors of 1000 except 1000 itself (999 steps).
        # Only this direction holds: some other counts also run in full (39, 42, …, 167), so "otherwise
        # smaller" would be too strong.
        if steps <= 36 or (1000 % steps == 0 and steps < 1000):
            assert n == steps, steps


def test_flash_timesteps():
    assert FLASH_TIMESTEPS == (979, 729, 479, 229) == tuple(range(979, 0, -250))


@pytest.mark.parametrize(
    "steps, expected_head, expected_tail",
    [(25, [961, 921], [41, 1]), (50, [981, 961], [21, 1]), (10, [901, 801], [101, 1]), (5, [801, 601], [201, 1])],
)
def test_leading_timesteps_match_spec(steps, expected_head, expected_tail):
    ts = leading_timesteps(steps)
    assert ts[:2] == expected_head and ts[-2:] == expected_tail and len(ts) == steps


def test_ddpm_and_ddim_spacings_equal_diffusers_lists():
    for steps in (1, 3, 5, 7, 10, 25, 33, 50, 999):
        for spacing, ours in [
            ("leading", leading_timesteps(steps, offset=1)),
            ("linspace", linspace_timesteps(steps)),
            ("trailing", trailing_timesteps(steps)),
        ]:
            ref = diffusers.DDPMScheduler(
                beta_schedule="squaredcos_cap_v2",
                timestep_spacing=spacing,
                steps_offset=1 if spacing == "leading" else 0,
            )
            ref.set_timesteps(steps)
            assert ours == ref.timesteps.tolist(), (spacing, steps)
        ddim = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2")  # defaults: leading, steps_offset=0
        ddim.set_timesteps(steps)
        assert leading_timesteps(steps, offset=0) == ddim.timesteps.tolist()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers' DPM
def test_dpm_solver_timesteps_equal_diffusers_lists():
    for steps in (1, 2, 5, 10, 20, 25, 33, 50):
        for spacing in ("linspace", "leading", "trailing"):
            ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
            ref.set_timesteps(steps)
            assert dpm_solver_timesteps(steps, spacing=spacing) == ref.timesteps.tolist(), (spacing, steps)
    assert dpm_solver_timesteps(10) == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


def test_img2img_defaults_keep_7_steps():
    assert img2img_timesteps(leading_timesteps(25), 0.3) == [241, 201, 161, 121, 81, 41, 1]


def test_img2img_strength_examples_from_spec():
    ts = img2img_timesteps(leading_timesteps(25), 0.75)
    assert len(ts) == 18 and ts[0] == 681 and ts[-1] == 1
    assert img2img_timesteps(leading_timesteps(10), 0.75) == [601, 501, 401, 301, 201, 101, 1]
    assert img2img_timesteps(leading_timesteps(5), 0.75) == [401, 201, 1]
    assert img2img_timesteps(leading_timesteps(25), 1.0) == leading_timesteps(25)


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_timestep_builders_reject_bad_step_counts(steps):
    builders = (original_timesteps, leading_timesteps, linspace_timesteps, trailing_timesteps, dpm_solver_timesteps)
    for builder in builders:
        with pytest.raises(ValueError, match="steps must be in"):
            builder(steps)


def test_leading_timesteps_rejects_offset_past_the_table():
    with pytest.raises(ValueError, match="offset=1"):
        leading_timesteps(1000, offset=1)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_img2img_rejects_strength_outside_unit_interval(strength):
    with pytest.raises(ValueError, match="strength must be in"):
        img2img_timesteps(leading_timesteps(25), strength)


def test_img2img_rejects_strength_that_keeps_no_step():
    with pytest.raises(ValueError, match="0 steps"):
        img2img_timesteps(leading_timesteps(25), 0.03)


def test_check_timesteps_rejects_bad_lists():
    with pytest.raises(ValueError, match="empty"):
        check_timesteps([], 1000)
    with pytest.raises(ValueError, match="strictly descending"):
        check_timesteps([1, 5], 1000)
    with pytest.raises(ValueError, match="lie in"):
        check_timesteps([1000, 5], 1000)
    assert check_timesteps(torch.tensor([9, 3]), 1000) == [9, 3]
