"""Samplers as pure functions over an ε-predicting denoiser (docs/architecture.md §5.5–§5.8).

Every sampler has the leading signature

    sampler(denoiser, x, timesteps, alphas_cumprod, *, generator=None, callback=None, progress=None, ...) -> x

* ``denoiser(x_t, t) -> ε̂`` — see ``guidance.Denoiser``; CFG and conditioning are already bound.
* ``x`` — (B, C, H, W) start latent (pure noise for text-to-image, ``q_sample`` output for img2img). The loop
  runs in x's dtype; schedule arithmetic runs in fp32 (fp64 if x is fp64) and is moved to x's device once.
* ``timesteps`` — descending ints (list, tuple or 1-D tensor) from the builders in ``schedule.py``.
* ``alphas_cumprod`` — the (T,) ᾱ table (``cosine_alphas_cumprod()``).
* ``generator`` — the only source of randomness. Noise is drawn like diffusers' ``randn_tensor``:
  ``torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype)`` then moved to x's device, so a CPU
  generator gives the same numbers on any device; a list of B generators draws sample by sample.
* ``callback(info)`` — called once per step with ``{"step": i, "t": t, "x": x_t, "x0": x̂₀}`` (x_t is the
  step's input; observe only). ``progress`` — an iterable wrapper such as ``tqdm`` (the library shows none).

Which timesteps, defaults and options each sampler runs with in the pipelines is one table, :mod:`.registry`.
Every step starts the same way, :func:`_predict`: one network call, x̂₀ = (x_t − σ_t ε̂)/α_t
(``schedule.x0_from_eps``), the optional ``x0_transform`` (thresholding) and, where the update needs it, ε̂
re-derived from the transformed x̂₀. The loops below then only differ in their update.

Notation (architecture §5; Ho et al. 2020 "DDPM"; Song et al. 2021 "DDIM"; Lu et al. 2022 "DPM-Solver++")

    code        symbol                  meaning
    a, a_prev   ᾱ_t, ᾱ_prev             cumulative product of alphas at t and at the step's target
    alpha, sig  α_t = √ᾱ_t, σ_t = √(1−ᾱ_t)   signal and noise coefficients, x_t = α_t·x₀ + σ_t·ε
    eps         ε̂                       predicted noise (guided)
    x0          x̂₀                      predicted clean latent, after the optional ``x0_transform``
    beta        β                       DDPM variance of the step: 1 − ᾱ_t/ᾱ_prev (strided), or the grid's β_i
    sigma       σ                       std of the fresh noise added by an ancestral step (DDIM eq. 16)
    lam         λ_t = log(α_t/σ_t)      half log-SNR; h = λ_next − λ_t is the step size
    d           D                       DPM-Solver++ data term: x̂₀, or x̂₀ + (x̂₀ − x̂₀_prev)·h/(2h_prev) (2M)
    z           z ~ N(0, I)             fresh Gaussian noise
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from .guidance import Denoiser, hard_clip
from .schedule import check_timesteps, cosine_betas, eps_from_x0, original30_timesteps, x0_from_eps

Timesteps = Sequence[int] | torch.Tensor
GeneratorLike = torch.Generator | Sequence[torch.Generator] | None
X0Transform = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]
Progress = Callable[[Iterable], Iterable]


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _randn_like(x: torch.Tensor, generator: GeneratorLike) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, drawn on the generator's device (diffusers ``randn_tensor`` convention)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([_randn_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _schedule(alphas_cumprod: torch.Tensor, x: torch.Tensor, timesteps, final: float | None):
    """Validate timesteps and gather (ᾱ_t, ᾱ_prev) once, on x's device, for every step.

    ᾱ_prev of step i is ᾱ at the next list entry; for the last step it is ``final`` (1.0 = "to the data",
    or e.g. ᾱ_0) — or ᾱ[0] when ``final`` is None.
    """
    ts = check_timesteps(timesteps, alphas_cumprod.shape[0])
    ac = alphas_cumprod.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    a = ac[ts]  # (n,)
    last = ac[:1] if final is None else torch.full((1,), final, dtype=ac.dtype, device=ac.device)
    a_prev = torch.cat([a[1:], last])  # (n,)
    return ts, a, a_prev


def _steps(n: int, progress: Progress | None) -> Iterable[int]:
    return range(n) if progress is None else progress(range(n))


def _t_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)


def _identity(x0: torch.Tensor) -> torch.Tensor:
    return x0


def _predict(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: int,
    alpha: torch.Tensor,
    sig: torch.Tensor,
    x0_transform: X0Transform | None = None,
    recompute_eps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂₀) of one network call at (x_t, t): x̂₀ = (x_t − σ_t ε̂)/α_t (architecture §5.2), then
    ``x0_transform`` if given and, with ``recompute_eps``, ε̂ = (x_t − α_t x̂₀)/σ_t from the transformed x̂₀
    (architecture §5.4 steps 1–4)."""
    eps = denoiser(x, _t_batch(t, x))
    x0 = x0_from_eps(x, eps, alpha, sig)
    if x0_transform is not None:
        x0 = x0_transform(x0)
        if recompute_eps:
            eps = eps_from_x0(x, x0, alpha, sig)
    return eps, x0


def _report(callback: Callback | None, step: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback({"step": step, "t": t, "x": x, "x0": x0})


def _ddim_update(x0: torch.Tensor, eps: torch.Tensor, a_prev: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """DDIM eq. 12 before its noise term: √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev − σ²)·ε̂.

    The root's argument is clamped at 0: rounding can take it just below 0 on a huge jump (one 999 → 0 step),
    where the unclamped root would be NaN. The clamp changes no result that is not NaN without it.
    """
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps


def _add_noise(x: torch.Tensor, std: torch.Tensor, generator: GeneratorLike) -> torch.Tensor:
    """x + std·z, z ~ N(0, I) from ``generator``: the ancestral part of a step."""
    return x + std * _randn_like(x, generator)


def _alpha_sigma(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) = (√ᾱ_t, √(1−ᾱ_t)), computed through the VE noise level s = √((1−ᾱ)/ᾱ) as α = 1/√(s²+1),
    σ = s·α — the route diffusers' DPM-Solver takes. At t = 999, x̂₀ = (x_t − σ_t ε̂)/α_t amplifies a 1-ulp
    difference in σ_t by 1/α_t ≈ 2·10⁴, so matching diffusers in fp32 needs the identical arithmetic.
    """
    s = ((1 - a) / a).sqrt()
    alpha = 1 / (s**2 + 1).sqrt()
    return alpha, s * alpha


# --------------------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------------------


def sample_original(
    denoiser: Denoiser, x: torch.Tensor, timesteps: Timesteps, alphas_cumprod: torch.Tensor, *,
    eta: float = 1.0, x0_transform: X0Transform | None = hard_clip,
    generator: GeneratorLike = None, callback: Callback | None = None, progress: Progress | None = None,
) -> torch.Tensor:
    """Kandinsky 3.1 sampler (architecture §5.5): DDIM-form update with thresholded x̂₀ and re-derived ε̂.

    Each step goes t → t_prev (the next entry; 0 after the last), so the last step targets ᾱ_0 = 0.999959
    (not 1) and returns that step's mean. ``eta`` sits INSIDE the square root of σ: eta = 1 (default) is
    ancestral DDPM with skipped steps, eta = 0 deterministic DDIM, otherwise DDIM's η = √eta.
    ``x0_transform`` defaults to ``hard_clip`` (the original without a percentile); the pipelines pass
    ``partial(dynamic_threshold, percentile=0.99)`` (T2I) or 0.95 (inpainting); None disables it.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    transform = x0_transform or _identity
    ts, a_all, a_prev_all = _schedule(alphas_cumprod, x, timesteps, final=None)
    t_prev_all = ts[1:] + [0]
    for i in _steps(len(ts), progress):
        a, a_prev = a_all[i], a_prev_all[i]
        # 1. Guided ε̂, x̂₀ = (x_t − √(1−ᾱ_t)ε̂)/√ᾱ_t thresholded, ε̂ re-derived from it (architecture §5.4 steps 1–4).
        eps, x0 = _predict(denoiser, x, ts[i], a.sqrt(), (1 - a).sqrt(), transform, recompute_eps=True)
        _report(callback, i, ts[i], x, x0)
        # 2. σ = √(eta·(1 − ᾱ_t/ᾱ_prev)·(1 − ᾱ_prev)/(1 − ᾱ_t)) (architecture §5.5; DDIM eq. 16 with η² = eta).
        sigma = (eta * (1 - a / a_prev) * (1 - a_prev) / (1 - a)).sqrt()
        # 3. mean = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ²) ε̂ (DDIM eq. 12; the original gives NaN where the root's
        #    argument rounds below 0, we give 0).
        x = _ddim_update(x0, eps, a_prev, sigma)
        # 4. Ancestral noise σ·z, except on the step that lands on t_prev = 0 (the returned latent is the mean).
        if eta > 0 and t_prev_all[i] != 0:
            x = _add_noise(x, sigma, generator)
    return x


def sample_original30(
    denoiser: Denoiser, x: torch.Tensor, timesteps: Timesteps, alphas_cumprod: torch.Tensor | None = None, *,
    x0_transform: X0Transform | None = hard_clip,
    generator: GeneratorLike = None, callback: Callback | None = None, progress: Progress | None = None,
) -> torch.Tensor:
    """Kandinsky 3.0 sampler (architecture §5.6): ancestral DDPM on a cosine schedule rebuilt with T = S steps.

    ``timesteps`` are the labels the U-Net is told, ``original30_timesteps(S)`` = (S−1)·k, …, k, 0 with
    k = 1000 // S; label i·k is grid index i. The noise levels come from ``cosine_betas(S)``, not from the
    1000-step table (``alphas_cumprod`` is accepted for the common signature and ignored), so label 20·i runs
    at the 1000-step noise level of 20·i + 19 — the original's 19-step lag, kept. Each step: x̂₀ =
    (x_t − √(1−ᾱ_i) ε̂)/√ᾱ_i on the grid, ``x0_transform``, then the DDPM posterior
    mean = β_i√ᾱ_{i−1}/(1−ᾱ_i)·x̂₀ + (1−ᾱ_{i−1})√(1−β_i)/(1−ᾱ_i)·x_t plus std·z with the posterior
    variance β_i(1−ᾱ_{i−1})/(1−ᾱ_i); no noise at index 0, which returns the mean.
    """
    del alphas_cumprod  # the grid is rebuilt from the number of steps
    steps = len(timesteps)
    labels = [int(t) for t in timesteps]
    if steps == 0 or labels != original30_timesteps(steps):
        raise ValueError(f"the 3.0 sampler takes original30_timesteps({steps}) = (S−1)·k … k, 0 with k = 1000 // S, "
                         f"got {labels[:4]}…")
    work = torch.promote_types(x.dtype, torch.float32)
    beta = cosine_betas(steps).to(device=x.device, dtype=work)  # (S,) β_i on the S-point grid
    a = torch.cumprod(1 - beta, dim=0)  # ᾱ_i
    a_prev = torch.cat([a.new_ones(1), a[:-1]])  # ᾱ_{i−1}, 1 before index 0
    for step in _steps(steps, progress):
        i = steps - 1 - step  # grid index, S−1 → 0
        # 1. ε̂ at label i·k; x̂₀ with the grid's ᾱ_i, thresholded (architecture §5.6).
        _, x0 = _predict(denoiser, x, labels[step], a[i].sqrt(), (1 - a[i]).sqrt(), x0_transform)
        _report(callback, step, labels[step], x, x0)
        # 2. Posterior mean μ̃ = β_i√ᾱ_{i−1}/(1−ᾱ_i)·x̂₀ + (1−ᾱ_{i−1})√(1−β_i)/(1−ᾱ_i)·x_t (DDPM eq. 7).
        x = (beta[i] * a_prev[i].sqrt() * x0 + (1 - a_prev[i]) * (1 - beta[i]).sqrt() * x) / (1 - a[i])
        # 3. Posterior std √(β_i(1−ᾱ_{i−1})/(1−ᾱ_i)) (DDPM eq. 7); index 0 returns the mean.
        if i > 0:
            x = _add_noise(x, (beta[i] * (1 - a_prev[i]) / (1 - a[i])).sqrt(), generator)
    return x


def sample_ddpm(
    denoiser: Denoiser, x: torch.Tensor, timesteps: Timesteps, alphas_cumprod: torch.Tensor, *,
    x0_transform: X0Transform | None = hard_clip,
    generator: GeneratorLike = None, callback: Callback | None = None, progress: Progress | None = None,
) -> torch.Tensor:
    """Strided ancestral DDPM, diffusers ``DDPMScheduler`` semantics (architecture §5.8; Ho et al. 2020 eqs. 6–7).

    Pass ``leading_timesteps(n)`` for the kandinsky-community config (``clip_sample=True``, ``steps_offset=1``,
    ``variance_type="fixed_small"``). The previous timestep is the next entry and ᾱ_prev = 1 after the last.
    x̂₀ goes through ``x0_transform`` (default ``hard_clip`` = ``clip_sample``; None = no clipping).
    Noise σ·z with σ² = (1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev) is added on every step but the last, where
    σ = 0. (diffusers still draws a z there when t > 0 and adds √1e-20·z = 1e-10·z; we draw nothing.)
    """
    ts, a_all, a_prev_all = _schedule(alphas_cumprod, x, timesteps, final=1.0)
    for i in _steps(len(ts), progress):
        a, a_prev = a_all[i], a_prev_all[i]
        beta = 1 - a / a_prev  # β_t of the strided jump
        # 1. x̂₀ from ε̂ (DDPM eq. 15), clipped/thresholded.
        _, x0 = _predict(denoiser, x, ts[i], a.sqrt(), (1 - a).sqrt(), x0_transform)
        _report(callback, i, ts[i], x, x0)
        # 2. Posterior mean μ̃ = √ᾱ_prev β_t/(1−ᾱ_t) x̂₀ + √(ᾱ_t/ᾱ_prev)(1−ᾱ_prev)/(1−ᾱ_t) x_t (DDPM eq. 7).
        x = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((a / a_prev).sqrt() * (1 - a_prev) / (1 - a)) * x
        # 3. "fixed_small" posterior variance β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t; none on the final step.
        if i < len(ts) - 1:
            x = _add_noise(x, ((1 - a_prev) / (1 - a) * beta).sqrt(), generator)
    return x


def sample_ddim(
    denoiser: Denoiser, x: torch.Tensor, timesteps: Timesteps, alphas_cumprod: torch.Tensor, *,
    eta: float = 0.0, set_alpha_to_one: bool = True, x0_transform: X0Transform | None = None,
    recompute_eps: bool = True,
    generator: GeneratorLike = None, callback: Callback | None = None, progress: Progress | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with diffusers ``DDIMScheduler`` semantics; η = 0 is deterministic.

    The previous timestep is the next entry; after the last, ᾱ_prev = 1 (``set_alpha_to_one=True``, the diffusers
    default) or ᾱ_0 (False, what the kandinsky-community config would give). σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))
    (η OUTSIDE the root, unlike ``sample_original``). As in diffusers, noise is drawn on every step when η > 0,
    including the last (where σ = 0 unless ``set_alpha_to_one=False``). With an ``x0_transform`` ε̂ is
    recomputed from the transformed x̂₀ when ``recompute_eps`` (diffusers' ``use_clipped_model_output=True``);
    with ``recompute_eps=False`` the network's ε̂ is kept, as diffusers' pipelines call ``step`` by default.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, a_all, a_prev_all = _schedule(alphas_cumprod, x, timesteps, final=1.0 if set_alpha_to_one else None)
    for i in _steps(len(ts), progress):
        a, a_prev = a_all[i], a_prev_all[i]
        # 1. x̂₀ = (x_t − √(1−ᾱ_t)ε̂)/√ᾱ_t (DDIM eq. 12, "predicted x₀"), optionally transformed.
        eps, x0 = _predict(denoiser, x, ts[i], a.sqrt(), (1 - a).sqrt(), x0_transform, recompute_eps=recompute_eps)
        _report(callback, i, ts[i], x, x0)
        # 2. σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)) (DDIM eq. 16).
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        # 3. x_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev−σ²) ε̂ + σ·z (DDIM eq. 12), z drawn on every step when η > 0.
        x = _ddim_update(x0, eps, a_prev, sigma)
        if eta > 0:
            x = _add_noise(x, sigma, generator)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, timesteps: Timesteps, alphas_cumprod: torch.Tensor, *,
    final_sigmas_type: str = "zero", lower_order_final: bool = True, euler_at_final: bool = False,
    x0_transform: X0Transform | None = None, sde: bool = False,
    generator: GeneratorLike = None, callback: Callback | None = None, progress: Progress | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, midpoint form (Lu et al. 2022, Alg. 2); deterministic.

    Matches diffusers ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint")`` with its defaults: after the last timestep the solver goes to σ = 0
    (``final_sigmas_type="zero"``, where it returns x̂₀ exactly) or to ᾱ_0 ("sigma_min"). The first step is
    first order; the last step is first order when the final σ is zero, when ``euler_at_final``, or when
    ``lower_order_final`` and fewer than 15 steps — all other steps are second order. Use
    ``dpm_solver_timesteps(n)`` for diffusers' default list. ``sde=True`` is the stochastic variant
    (:func:`sample_dpmpp_2m_sde`); otherwise ``generator`` is accepted for a uniform signature and unused.
    """
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
    ts, a_all, a_prev_all = _schedule(alphas_cumprod, x, timesteps, final=1.0 if final_sigmas_type == "zero" else None)
    n = len(ts)
    alpha_all, sig_all = _alpha_sigma(a_all)
    alpha_next_all, sig_next_all = _alpha_sigma(a_prev_all)
    lam_all = alpha_all.log() - sig_all.log()
    lam_next_all = alpha_next_all.log() - sig_next_all.log()  # +inf when the target is σ = 0
    first_order_last = final_sigmas_type == "zero" or euler_at_final or (lower_order_final and n < 15)
    x0_prev = h_prev = None
    for i in _steps(n, progress):
        alpha_next, sig, sig_next = alpha_next_all[i], sig_all[i], sig_next_all[i]
        # 1. Data prediction x̂₀ = (x_t − σ_t ε̂)/α_t (DPM-Solver++ §3), optionally transformed.
        _, x0 = _predict(denoiser, x, ts[i], alpha_all[i], sig, x0_transform)
        _report(callback, i, ts[i], x, x0)
        h = lam_next_all[i] - lam_all[i]
        # 2. First order uses D = x̂₀. Second order (midpoint, Alg. 2) extrapolates it to the middle of the step:
        #    D = x̂₀ + (1/(2r))(x̂₀ − x̂₀_prev), r = h_prev/h. The SDE variant uses the same D.
        if x0_prev is None or (i == n - 1 and first_order_last):
            d = x0
        else:
            d = x0 + (x0 - x0_prev) * (h / (2 * h_prev))
        if sde:
            # 3a. SDE-DPM-Solver++: x_next = (σ_next/σ_t)e^{−h} x_t + α_next(1 − e^{−2h}) D + σ_next√(1 − e^{−2h}) z.
            #     A σ = 0 target (h = +∞) gives exactly x_next = D; z is still drawn, as diffusers does.
            gain = -torch.expm1(-2 * h)  # 1 − e^{−2h}
            z = _randn_like(x, generator)
            x = (sig_next / sig * torch.exp(-h)) * x + (alpha_next * gain) * d + (sig_next * gain.sqrt()) * z
        else:
            # 3b. ODE (DDIM η=0 when D = x̂₀): x_next = (σ_next/σ_t) x_t − α_next (e^{−h} − 1) D.
            x = (sig_next / sig) * x - (alpha_next * torch.expm1(-h)) * d
        x0_prev, h_prev = x0, h
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser, x: torch.Tensor, timesteps: Timesteps, alphas_cumprod: torch.Tensor, **options
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), data prediction, midpoint form (Lu et al. 2022, the SDE variant); stochastic.

    Matches diffusers ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2,
    solver_type="midpoint")``. With h = λ_next − λ_t each step is
    x_next = (σ_next/σ_t)e^{−h} x_t + α_next(1 − e^{−2h}) D + σ_next√(1 − e^{−2h}) z, with the same D, the
    same first-order steps and the same ``final_sigmas_type`` / ``lower_order_final`` / ``euler_at_final``
    rules as ``sample_dpmpp_2m`` (a σ = 0 final target returns the last x̂₀ exactly). One z is drawn from
    ``generator`` on every step, the last included, as diffusers' ``step`` draws it, so the same CPU
    generator gives diffusers' result (diffusers draws in fp32; here in x's dtype, the same for fp32 x).
    ``options`` are those of :func:`sample_dpmpp_2m`.
    """
    return sample_dpmpp_2m(denoiser, x, timesteps, alphas_cumprod, sde=True, **options)


def sample_flash(
    denoiser: Denoiser, x: torch.Tensor, timesteps: Timesteps, alphas_cumprod: torch.Tensor, *,
    generator: GeneratorLike = None, callback: Callback | None = None, progress: Progress | None = None,
) -> torch.Tensor:
    """Kandinsky Flash (3.1, ``gan=True``; architecture §5.7): re-noise, one call, take x̂₀ — four times.

    img starts as ``x`` (pure noise). At every t, including the first, img is re-noised with fresh noise,
    x_t = √ᾱ_t·img + √(1−ᾱ_t)·z, exactly as the original's ``q_sample(img, t)`` (at the first step x_t is
    therefore a fresh mix of two unit Gaussians, not ``x`` itself); ε̂ = denoiser(x_t, t) with a
    conditional-only denoiser (no CFG, no null embedding, no thresholding); img = x̂₀. Returns the x̂₀ of the
    last timestep (229 with ``FLASH_TIMESTEPS``, the list to pass).
    """
    ts, a_all, _ = _schedule(alphas_cumprod, x, timesteps, final=None)
    img = x
    for i in _steps(len(ts), progress):
        alpha, sig = a_all[i].sqrt(), (1 - a_all[i]).sqrt()
        # 1. Re-noise the current estimate with fresh noise: x_t = α_t·img + σ_t·z (the original's q_sample).
        x_t = alpha * img + sig * _randn_like(img, generator)
        # 2. One conditional-only call; the estimate becomes x̂₀ = (x_t − σ_t ε̂)/α_t.
        _, img = _predict(denoiser, x_t, ts[i], alpha, sig)
        _report(callback, i, ts[i], x_t, img)
    return img
