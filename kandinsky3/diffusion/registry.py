"""The sampler table: one entry per sampler, read by the pipelines, the CLI and the server (architecture §5.5–§5.8).

Everything a caller needs to know about a sampler besides its algorithm lives in its :class:`SamplerEntry`: the
function, its timestep rule and default step count, whether it draws noise, whether it takes η (and its
default), what its x̂₀ is thresholded with, how a diffusers ``scheduler_config.json`` translates to its options,
whether img2img can use it, and whether it needs the Kandinsky Flash weights. The choices the CLI offers, the
defaults and every refusal are derived from :data:`SAMPLER_TABLE`, so adding a sampler means adding one entry.

    get_sampler("ddpm").timesteps()        # the list a pipeline runs by default (leading spacing, 25 steps)
    sampler_names(for_img2img=True)        # ("original", "ddpm", "ddim")
    fn, timesteps, kwargs = sampler_setup("ddim", 30, eta=0.0, threshold=0.99, scheduler_config=None)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

import torch

from . import samplers, schedule
from .guidance import dynamic_threshold, hard_clip

Thresholding = Literal["always", "original_layout", "never"]


@dataclass(frozen=True)
class SamplerEntry:
    """One sampler and the rules the pipelines apply to it.

    Attributes:
        name: the name users pass (``sampler="ddim"``, ``--sampler ddim``).
        function: the sampler, ``function(denoiser, x, timesteps, alphas_cumprod, **options) -> x``.
        timestep_rule: the descending timestep list for a number of steps.
        default_steps: the steps when the caller gives none.
        stochastic: whether it draws fresh noise at its default options (the seed then matters beyond the start
            latent).
        eta: the default η of a sampler that takes ``eta``; None for one that refuses it.
        thresholding: which x̂₀ treatment it gets: "always" Kandinsky's (dynamic thresholding at the pipeline's
            percentile, or a hard clip to [−1, 1] without one, architecture §5.4); "original_layout" Kandinsky's
            with original-layout weights, and with diffusers-layout weights what their scheduler config says
            (``scheduler_options``; nothing if it has none); "never" none.
        scheduler_options: for samplers that mirror the scheduler class of a diffusers ``scheduler_config.json``,
            the options that config sets (its spacing and offset set the timesteps, see
            :func:`scheduler_config_timesteps`); None: such a config does not apply.
        img2img_refusal: why img2img cannot use it, completing "'name' …"; None: img2img can.
        needs_flash_weights: runs only with (and is the only sampler of) the Kandinsky Flash weights.
        summary: one line for help texts and listings.
    """

    name: str
    function: Callable[..., torch.Tensor]
    timestep_rule: Callable[[int], list[int]]
    default_steps: int
    stochastic: bool
    eta: float | None
    thresholding: Thresholding
    summary: str
    scheduler_options: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    img2img_refusal: str | None = None
    needs_flash_weights: bool = False

    def timesteps(self, steps: int | None = None) -> list[int]:
        """The timestep list for ``steps`` (None: ``default_steps``)."""
        return self.timestep_rule(self.default_steps if steps is None else steps)


# --------------------------------------------------------------------------------------------------------------
# Rules that some entries share
# --------------------------------------------------------------------------------------------------------------


def _community_leading_timesteps(steps: int) -> list[int]:
    """The kandinsky-community scheduler's spacing, "leading" with ``steps_offset=1`` (architecture §5.8)."""
    return schedule.leading_timesteps(steps, offset=1)


def _flash_timesteps(steps: int) -> list[int]:
    """Flash runs its fixed list; any other ``steps`` is an error rather than ignored as in the original."""
    fixed = list(schedule.FLASH_TIMESTEPS)
    if steps != len(fixed):
        raise ValueError(f"flash runs exactly the {len(fixed)} timesteps {fixed}, got steps={steps}")
    return fixed


def _ddpm_scheduler_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``DDPMScheduler``: ``clip_sample`` (default True) hard-clips x̂₀."""
    return {"x0_transform": hard_clip if config.get("clip_sample", True) else None}


def _ddim_scheduler_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``DDIMScheduler``: ``clip_sample`` and ``set_alpha_to_one`` (both default True); ε̂ is kept as the
    network gave it, since diffusers' pipelines call ``step`` without ``use_clipped_model_output``."""
    return {
        **_ddpm_scheduler_options(config),
        "set_alpha_to_one": bool(config.get("set_alpha_to_one", True)),
        "recompute_eps": False,
    }


_DPMPP_2M = SamplerEntry(
    "dpmpp_2m", samplers.sample_dpmpp_2m, schedule.dpm_solver_timesteps, 25, stochastic=False, eta=None,
    thresholding="original_layout", img2img_refusal="is not validated on strength-truncated timestep lists",
    summary="DPM-Solver++(2M), deterministic, as diffusers' DPMSolverMultistepScheduler",
)

SAMPLER_TABLE: tuple[SamplerEntry, ...] = (
    SamplerEntry(
        "original", samplers.sample_original, schedule.original_timesteps, 50, stochastic=True, eta=1.0,
        thresholding="always",
        summary="Kandinsky 3.1: DDIM-form update with thresholded x̂₀; eta 1 ancestral, 0 deterministic",
    ),
    SamplerEntry(
        "original30", samplers.sample_original30, schedule.original30_timesteps, 50, stochastic=True, eta=None,
        thresholding="always", img2img_refusal="rebuilds its noise levels from the length of the whole timestep list",
        summary="Kandinsky 3.0: ancestral DDPM on a cosine grid of the step count",
    ),
    SamplerEntry(
        "ddpm", samplers.sample_ddpm, _community_leading_timesteps, 25, stochastic=True, eta=None,
        thresholding="original_layout", scheduler_options=_ddpm_scheduler_options,
        summary="strided ancestral DDPM, as diffusers' DDPMScheduler (the diffusers port's default)",
    ),
    SamplerEntry(
        "ddim", samplers.sample_ddim, _community_leading_timesteps, 50, stochastic=False, eta=0.0,
        thresholding="original_layout", scheduler_options=_ddim_scheduler_options,
        summary="DDIM, as diffusers' DDIMScheduler; deterministic unless eta > 0",
    ),
    _DPMPP_2M,
    replace(  # the same solver with fresh noise at every step
        _DPMPP_2M, name="dpmpp_2m_sde", function=samplers.sample_dpmpp_2m_sde, stochastic=True,
        summary="SDE-DPM-Solver++(2M), stochastic, as diffusers' sde-dpmsolver++",
    ),
    SamplerEntry(
        "flash", samplers.sample_flash, _flash_timesteps, len(schedule.FLASH_TIMESTEPS), stochastic=True, eta=None,
        thresholding="never", needs_flash_weights=True, img2img_refusal="starts from pure noise at fixed timesteps",
        summary="Kandinsky Flash: 4 fixed steps, re-noise and take x̂₀, no guidance (Flash weights only)",
    ),
)

_BY_NAME: Mapping[str, SamplerEntry] = MappingProxyType({entry.name: entry for entry in SAMPLER_TABLE})


# --------------------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------------------


def sampler_names(*, for_img2img: bool = False, flash_weights: bool = False) -> tuple[str, ...]:
    """The samplers a model can run, in table order: those of the base (or inpainting) weights, or the Flash
    weights' own; with ``for_img2img`` only those img2img can use."""
    return tuple(
        entry.name for entry in SAMPLER_TABLE
        if entry.needs_flash_weights == flash_weights and not (for_img2img and entry.img2img_refusal)
    )


def get_sampler(name: str) -> SamplerEntry:
    """The table entry of ``name``; a ValueError names the choices."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def _quoted(names: tuple[str, ...]) -> str:
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def check_usable(name: str, *, flash_weights: bool = False, img2img: bool = False, eta: float | None = None) -> None:
    """Raise a ValueError naming the alternatives when ``name`` cannot run here: with these weights (the Flash
    weights or not), for img2img, or with an ``eta``. An unknown name is refused by :func:`get_sampler`."""
    entry = get_sampler(name)
    if entry.needs_flash_weights and not flash_weights:
        raise ValueError(f"the {name!r} sampler needs the Kandinsky Flash weights (get_T2I_Flash_pipeline, "
                         f"`kandinsky3 generate --flash`); these weights run {_quoted(sampler_names())}")
    if flash_weights and not entry.needs_flash_weights:
        raise ValueError(f"the Kandinsky Flash weights run only {_quoted(sampler_names(flash_weights=True))}, "
                         f"not {name!r}")
    if img2img and entry.img2img_refusal:
        raise ValueError(f"img2img supports the {_quoted(sampler_names(for_img2img=True))} samplers "
                         f"({name!r} {entry.img2img_refusal})")
    if eta is not None and entry.eta is None:
        takes_eta = tuple(e.name for e in SAMPLER_TABLE if e.eta is not None)
        raise ValueError(f"eta applies to the {_quoted(takes_eta)} samplers, not {name!r}")


# --------------------------------------------------------------------------------------------------------------
# From a call's arguments to a sampler run
# --------------------------------------------------------------------------------------------------------------


def sampler_setup(
    sampler: str,
    steps: int | None,
    *,
    eta: float | None,
    threshold: float | None,
    scheduler_config: Mapping[str, Any] | None,
    flash_weights: bool = False,
    img2img: bool = False,
) -> tuple[Callable[..., torch.Tensor], list[int], dict[str, Any]]:
    """Sampler function, timesteps and keyword arguments for one pipeline call.

    ``threshold`` is the dynamic-thresholding percentile of x̂₀ (None: hard clip to [−1, 1]) of the samplers
    whose entry's ``thresholding`` asks for Kandinsky's treatment. A diffusers-layout checkpoint's
    ``scheduler_config`` sets the timesteps and options of the samplers that mirror its scheduler class
    (``SamplerEntry.scheduler_options``), as diffusers' schedulers built from that config would; the other
    samplers keep their own rules. ``flash_weights`` and ``img2img`` describe the caller, for the refusals
    of :func:`check_usable`.
    """
    check_usable(sampler, flash_weights=flash_weights, img2img=img2img, eta=eta)
    entry = get_sampler(sampler)
    kwargs: dict[str, Any] = {} if eta is None else {"eta": float(eta)}
    if entry.thresholding == "always" or (entry.thresholding == "original_layout" and scheduler_config is None):
        # Kandinsky 3's own x̂₀ treatment; with original-layout weights every sampler gets it (without it the
        # deterministic samplers drift: x̂₀ = (x − σ ε̂)/α is unbounded at high noise)
        kwargs["x0_transform"] = (
            functools.partial(dynamic_threshold, percentile=threshold) if threshold else hard_clip
        )
    if scheduler_config is None or entry.scheduler_options is None:
        return entry.function, entry.timesteps(steps), kwargs
    n = entry.default_steps if steps is None else steps
    timesteps = scheduler_config_timesteps(scheduler_config, n)
    return entry.function, timesteps, {**kwargs, **entry.scheduler_options(scheduler_config)}


def scheduler_config_timesteps(scheduler_config: Mapping[str, Any], steps: int) -> list[int]:
    """The DDPM/DDIM timestep list a diffusers scheduler built from ``scheduler_config`` would run
    (``timestep_spacing`` default "leading", ``steps_offset`` default 0; architecture §5.8)."""
    spacing = _spacing(scheduler_config)
    if spacing == "leading":
        return schedule.leading_timesteps(steps, offset=int(scheduler_config.get("steps_offset", 0)))
    if spacing == "trailing":
        return schedule.trailing_timesteps(steps)
    return schedule.linspace_timesteps(steps)


def _spacing(scheduler_config: Mapping[str, Any]) -> str:
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if spacing not in ("leading", "linspace", "trailing"):
        raise ValueError(f"scheduler_config timestep_spacing={spacing!r} is not 'leading', 'linspace' or 'trailing'")
    return spacing


def check_scheduler_config(scheduler_config: Mapping[str, Any] | None) -> None:
    """Refuse a diffusers scheduler config Kandinsky 3 was not trained for (the 1000-step cosine schedule with
    ε-prediction) or one whose timestep spacing diffusers itself does not know."""
    if scheduler_config is None:
        return
    checks = {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "num_train_timesteps": schedule.NUM_TRAIN_TIMESTEPS,
    }
    for key, expected in checks.items():
        if key in scheduler_config and scheduler_config[key] != expected:
            raise ValueError(
                f"scheduler_config {key}={scheduler_config[key]!r} is not supported; Kandinsky 3 uses {expected!r}"
            )
    _spacing(scheduler_config)
