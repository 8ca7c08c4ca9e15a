"""Text-to-image and Kandinsky Flash pipelines (SPEC §5.5–5.8, §6.2–6.3, §6.5).

The pipeline owns no weights: the U-Net, MoVQ and text encoder come in already built (see
:mod:`kandinsky3.pipelines.factory` for loading).  ``__call__`` runs named stages:
validate → encode text → per mini-batch (prepare latents → denoise) → decode → output.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from ..diffusion import schedule
from ..models.text_encoder import TextEncoder
from . import common
from .residency import Loader, Residency

__all__ = ["Kandinsky3Pipeline"]


class Kandinsky3Pipeline(Residency, common.TiledDecoding):
    """Text-to-image with the Kandinsky 3 base model, or 4-step Kandinsky Flash (``flash=True``).

    Args:
        unet: ε-predicting :class:`~kandinsky3.models.UNet` with 4 input channels.
        movq: :class:`~kandinsky3.models.MoVQ` (8× autoencoder).
        text_encoder: :class:`~kandinsky3.models.TextEncoder` (T5 + projection + null embedding).
        conditioning: "original" or "diffusers" semantics (module docstring of ``common``);
            the loaders pick it from the checkpoint layout.
        scheduler_config: a diffusers ``scheduler_config.json`` dict, if the weights brought one;
            then "ddpm" (25 steps, leading spacing) is the default sampler, as in diffusers.
        flash: Kandinsky Flash: 4 fixed steps, no guidance, no negative prompt.
        offload: {"unet": device, "text_encoder": device, "movq": device}: keep every component
            on the CPU and move it to its device only while it runs (the 8.6B text encoder is
            never resident beside the U-Net); None = components stay where they are.
        reload: {component: loader} for any of them: the component waits on the meta device,
            holding no memory, and ``loader()`` reads it from disk each time its phase starts
            (see :mod:`kandinsky3.pipelines.residency`; the factories' ``offload="disk"``).
    """

    default_guidance_scale = 3.0
    threshold_percentile = 0.99  # dynamic thresholding of the "original" sampler (SPEC §5.4)

    def __init__(
        self,
        unet: torch.nn.Module,
        movq: torch.nn.Module,
        text_encoder: TextEncoder,
        *,
        conditioning: str = "original",
        scheduler_config: dict[str, Any] | None = None,
        flash: bool = False,
        offload: dict[str, Any] | None = None,
        reload: dict[str, Loader] | None = None,
    ):
        if conditioning not in common.CONDITIONING_STYLES:
            raise ValueError(f"conditioning must be one of {common.CONDITIONING_STYLES}, got {conditioning!r}")
        common.check_scheduler_config(scheduler_config)
        self.unet, self.movq, self.text_encoder = unet, movq, text_encoder
        self.conditioning = conditioning
        self.scheduler_config = scheduler_config
        self.flash = flash
        self.set_residency(offload, reload)
        self.alphas_cumprod = schedule.cosine_alphas_cumprod()

    @property
    def default_sampler(self) -> str:
        if self.flash:
            return "flash"
        return "ddpm" if self.scheduler_config is not None else "original"

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        images_num: int | None = None,
        bs: int | None = None,
        width: int = 1024,
        height: int = 1024,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        output_type: str = "pil",
        decode_slice_size: int | None = 1,
    ) -> Any:
        """Generate images.

        Args:
            prompt: a prompt or a list of prompts.
            negative_prompt: one for all prompts or one per prompt (its own mask; not truncated).
            num_images_per_prompt / images_num: images per prompt (``images_num`` is the original name).
            bs: images per U-Net batch (the CFG batch is twice that); default all at once.
            width, height: pixels, multiples of 64 (MoVQ factor × U-Net factor).
            steps: sampler steps (default 50 for "original", 25 for "ddpm"/"dpmpp_2m"/"dpmpp_2m_sde").
            guidance_scale: w in ε = (w+1)·ε_cond − w·ε_uncond (default 3.0; 0 disables CFG).
            sampler: "original", "ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde" (stochastic DPM-Solver++)
                (or "flash" for Flash weights).
            eta: noise of the "original" (default 1) and "ddim" (default 0) samplers.
            seed / generator: seed → image i uses a CPU generator seeded seed + i.
            latents: (B, 4, height/8, width/8) start noise instead of drawing it.
            callback: called each step with {"step", "t", "x", "x0"} (observe only).
            progress: show a tqdm bar over the denoising steps.
            output_type: "pil" (list of PIL images), "np" ((B,H,W,3) in [0,1]),
                "pt" ((B,3,H,W) in [0,1]) or "latent" ((B,4,h,w)).

        Returns:
            The images in ``output_type`` form, B = len(prompts) · num_images_per_prompt.
        """
        prompts, negatives = self._check_inputs(
            prompt, negative_prompt, num_images_per_prompt, images_num, width, height, output_type
        )
        sampler, w = self._check_sampling(sampler, steps, guidance_scale, negative_prompt, eta)
        sample_fn, timesteps, kwargs = common.sampler_setup(
            sampler, steps, eta=eta, threshold=self.threshold_percentile,
            scheduler_config=self.scheduler_config,
        )
        factor = self.movq.config.downsample_factor
        shape = (len(prompts), self.unet.config.out_channels, height // factor, width // factor)
        latents = self._check_latents(latents, shape)
        generators = common.make_generators(seed, generator, len(prompts))
        with self.phase("text_encoder"):
            conditions = common.encode_text(
                self.text_encoder, prompts, negatives, conditioning=self.conditioning, guided=w != 0
            )

        def start(indices: list[int], gen) -> torch.Tensor:
            if latents is not None:
                return latents[indices]
            return common.initial_noise((len(indices), *shape[1:]), gen, torch.device("cpu"))

        with self.phase("unet"):
            result = common.denoise(
                self.unet, conditions, start, sample_fn=sample_fn, timesteps=timesteps,
                alphas_cumprod=self.alphas_cumprod, w=w, generators=generators, batch_size=bs,
                sampler_kwargs=kwargs, callback=callback, progress=progress,
            )
        if output_type == "latent":
            return result
        with self.phase("movq"):
            images = common.decode_latents(self.movq, result, decode_slice_size, self.decode_tiling)
        return common.to_output(images, output_type)

    # ----------------------------------------------------------------------------------- checks

    def _check_inputs(self, prompt, negative_prompt, num_images, images_num, width, height, output_type):
        """Prompts and negatives repeated per image; raises on bad sizes, counts or types."""
        if images_num is not None:
            if num_images != 1:
                raise ValueError("pass either images_num or num_images_per_prompt, not both")
            num_images = images_num
        prompts = common.as_prompt_list(prompt)
        negatives = common.expand_negatives(negative_prompt, len(prompts), num_images)
        common.check_size(width, height, common.size_multiple(self.unet, self.movq))
        common.check_output_type(output_type)
        return common.repeat_prompts(prompts, num_images), negatives

    def _check_sampling(self, sampler, steps, guidance_scale, negative_prompt, eta):
        """The sampler name and guidance weight w; Flash refuses what it would ignore."""
        if self.flash:
            given = {
                "guidance_scale": guidance_scale, "negative_prompt": negative_prompt, "eta": eta,
                "steps": steps if steps not in (None, 4) else None,
                "sampler": sampler if sampler not in (None, "flash") else None,
            }
            refused = [name for name, value in given.items() if value is not None]
            if refused:
                raise ValueError(
                    f"Kandinsky Flash runs 4 fixed steps without guidance; it does not take {refused}"
                )
            return "flash", 0.0
        sampler = sampler or self.default_sampler
        if sampler == "flash":
            raise ValueError("the 'flash' sampler needs the Flash weights: use get_T2I_Flash_pipeline")
        w = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if w < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {w}")
        if negative_prompt is not None and w == 0:
            raise ValueError("a negative prompt needs guidance (guidance_scale > 0)")
        return sampler, w

    @staticmethod
    def _check_latents(latents, shape):
        if latents is not None and tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        return latents
