"""Stages shared by the text-to-image, inpainting and img2img pipelines (STYLE §5 habit 10).

Plain functions over already-built components: validate sizes, encode the text for
classifier-free guidance, wrap the U-Net as a network call, choose a sampler and its
timesteps, decode latents in slices, convert images for output.

Conditioning semantics follow the weights (SPEC §4.4–4.6):
    "original"  — padded positions zeroed after the projection; the learned null embedding
                  (slot 0, mask 1 only there) is the unconditional context; negative prompts
                  are encoded with their own masks (the original truncated them — fixed here).
    "diffusers" — padded positions zeroed before the projection (so they hold the LayerNorm
                  bias); the unconditional context is that of zero embeddings, all masked;
                  negative prompts are cut to the prompt's length as diffusers does.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..diffusion import guidance, samplers, schedule
from ..models.text_encoder import TextEncoder
from ..models.movq_tiling import check_tiling, decode_tiled
from ..models.storage import compute_dtype

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CONDITIONING_STYLES = ("original", "diffusers")


def check_size(width: int, height: int, multiple: int = 64) -> None:
    """Raise a ValueError naming the nearest valid sizes unless both sides are positive multiples."""
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side <= 0:
            raise ValueError(f"{name} must be a positive int, got {side!r}")
        if side % multiple:
            lower, upper = side // multiple * multiple, (side // multiple + 1) * multiple
            nearest = f"{lower} and {upper}" if lower else f"{upper}"
            raise ValueError(
                f"{name}={side} is not a multiple of {multiple}; the nearest valid sizes are {nearest}"
            )


def size_multiple(unet: torch.nn.Module, movq: torch.nn.Module) -> int:
    """Image sides must be multiples of this: MoVQ factor × U-Net factor (8 × 8 = 64 released)."""
    return movq.config.downsample_factor * unet.config.downsample_factor


def as_prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """A str or a non-empty list of str as a list; anything else is a TypeError."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a str or a non-empty list of str, got {prompt!r}")
    return prompts


def repeat_prompts(prompts: list[str], num_images: int) -> list[str]:
    """Each prompt repeated ``num_images`` times, consecutively: [p0, p0, p1, p1, …]."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images!r}")
    return [p for p in prompts for _ in range(num_images)]


def expand_negatives(negative_prompt: str | Sequence[str] | None, num_prompts: int, count: int) -> list[str] | None:
    """Negative prompts one per image: a str serves every prompt, a list has one per prompt."""
    if negative_prompt is None:
        return None
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    if isinstance(negative_prompt, str):
        negatives = negatives * num_prompts
    elif len(negatives) != num_prompts:
        raise ValueError(f"got {len(negatives)} negative prompts for {num_prompts} prompts")
    return repeat_prompts(negatives, count)


@dataclass
class TextConditions:
    """Text conditions of one call: cond (context (B,L,D), mask (B,L)), uncond or None."""

    cond: tuple[torch.Tensor, torch.Tensor]
    uncond: tuple[torch.Tensor, torch.Tensor] | None


def encode_text(
    text_encoder: TextEncoder,
    prompts: list[str],
    negative_prompts: list[str] | None,
    *,
    conditioning: str,
    guided: bool,
) -> TextConditions:
    """Encode prompts (and negatives) for CFG with the semantics of ``conditioning``.

    ``prompts`` and ``negative_prompts`` are already one entry per image.  Without guidance no
    unconditional branch is built.  Runs under ``torch.inference_mode``.
    """
    if conditioning not in CONDITIONING_STYLES:
        raise ValueError(f"conditioning must be one of {CONDITIONING_STYLES}, got {conditioning!r}")
    diffusers_style = conditioning == "diffusers"
    with torch.inference_mode():
        if negative_prompts is not None and guided and not diffusers_style:
            context, mask, neg_context, neg_mask = text_encoder.encode_with_negative(prompts, negative_prompts)
            return TextConditions((context, mask), (neg_context, neg_mask))
        context, mask = text_encoder.encode(prompts, zero_before_projection=diffusers_style)
        if not guided:
            return TextConditions((context, mask), None)
        if negative_prompts is not None:  # diffusers: cut to the prompt's length
            uncond = text_encoder.encode_negative_diffusers(negative_prompts, context.shape[1])
        elif diffusers_style:
            uncond = text_encoder.zero_context_like(context, mask)
        else:
            uncond = text_encoder.null_context_like(context, mask)
    return_free_memory()  # the (streamed) T5's transient buffers
    return TextConditions((context, mask), uncond)


MODULATION_TABLE_LIMIT = 2**30  # bytes; larger batches × step counts compute the norms' inputs at every call


def unet_call(unet: torch.nn.Module, timesteps: Sequence[int] | None = None) -> guidance.NetCall:
    """Wrap a U-Net as ``net_call(x, t, context, mask) -> ε``: inputs go to the U-Net's device
    and dtype, ε comes back in the latents' dtype and device.

    With the sampler's ``timesteps``, the first call with a new context tensor precomputes the
    conditional norms' inputs for all of them (:meth:`UNet.modulation_table`: the 0.8B projection
    weights of the released U-Net are then read once per sampling run, not once per step), as long
    as the table stays under ``MODULATION_TABLE_LIMIT``; calls at other timesteps compute them as usual.
    """
    device, dtype = module_device(unet), compute_dtype(unet)
    tabled = timesteps is not None and hasattr(unet, "modulation_table")  # our UNet (not a stand-in network)
    state: dict[str, Any] = {"context": None, "table": None}  # the table of the context object last seen

    def modulation(t, context, mask):
        if not tabled:
            return None
        if state["context"] is not context:  # a new mini-batch: its [cond; uncond] context is a new tensor
            size = len(timesteps) * context.shape[0] * unet.modulation_width * torch.finfo(dtype).bits // 8
            table = None
            if size <= MODULATION_TABLE_LIMIT:
                table = unet.modulation_table(timesteps, context.to(device, dtype), mask.to(device))
            state.update(context=context, table=table)
        table = state["table"]
        return table if table is not None and table.row_of(t) is not None else None

    def call(x, t, context, mask):
        table = modulation(t, context, mask)
        extra = {} if table is None else {"modulation": table}
        eps = unet(x.to(device, dtype), t.to(device), context.to(device, dtype), mask.to(device), **extra)
        return eps.to(x.device, x.dtype)

    return call


def move_conditions(conditions: TextConditions, device: torch.device) -> TextConditions:
    """Text conditions on the latents' device (fp32 context kept as encoded)."""
    def move(pair):
        return None if pair is None else (pair[0].to(device), pair[1].to(device))

    return TextConditions(move(conditions.cond), move(conditions.uncond))


def sampler_setup(
    sampler: str,
    steps: int | None,
    *,
    eta: float | None,
    threshold: float | None,
    scheduler_config: dict[str, Any] | None,
) -> tuple[Callable[..., torch.Tensor], list[int], dict[str, Any]]:
    """Sampler function, timesteps and keyword arguments for one call.

    ``threshold`` is the dynamic-thresholding percentile of x̂₀ (None = hard clip to [−1, 1]) used by
    the "original" sampler, and by every sampler when there is no ``scheduler_config`` (original-layout
    weights).  A diffusers-layout checkpoint's ``scheduler_config`` sets the spacing, the offset,
    ``clip_sample`` and ``set_alpha_to_one`` of "ddpm" and "ddim", as diffusers' schedulers
    built from that config would.
    """
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(samplers.SAMPLERS)}")
    fn = samplers.SAMPLERS[sampler]
    kwargs: dict[str, Any] = {}
    if eta is not None:
        if sampler not in ("original", "ddim"):
            raise ValueError(f"eta applies to the 'original' and 'ddim' samplers, not {sampler!r}")
        kwargs["eta"] = float(eta)
    if sampler in ("original", "original30") or (scheduler_config is None and sampler != "flash"):
        # Kandinsky 3's own x̂₀ treatment; with original-layout weights every sampler gets it (without it the
        # deterministic samplers drift: x̂₀ = (x − σ ε̂)/α is unbounded at high noise)
        kwargs["x0_transform"] = (
            functools.partial(guidance.dynamic_threshold, percentile=threshold) if threshold else guidance.hard_clip
        )
    if scheduler_config is None or sampler not in ("ddpm", "ddim"):
        return fn, samplers.default_timesteps(sampler, steps), kwargs
    n = steps or samplers.DEFAULT_STEPS[sampler]
    spacing = scheduler_config.get("timestep_spacing", "leading")
    offset = int(scheduler_config.get("steps_offset", 0))
    if spacing == "leading":
        timesteps = schedule.leading_timesteps(n, offset=offset)
    elif spacing == "trailing":
        timesteps = schedule.trailing_timesteps(n)
    else:
        timesteps = schedule.linspace_timesteps(n)
    clip = scheduler_config.get("clip_sample", True)
    kwargs["x0_transform"] = guidance.hard_clip if clip else None
    if sampler == "ddim":
        kwargs["set_alpha_to_one"] = bool(scheduler_config.get("set_alpha_to_one", True))
        kwargs["recompute_eps"] = False  # diffusers pipelines call step() without use_clipped_model_output
    return fn, timesteps, kwargs


def check_scheduler_config(scheduler_config: dict[str, Any] | None) -> None:
    """Kandinsky 3 was trained on the 1000-step cosine schedule with ε-prediction; refuse others."""
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


class TiledDecoding:
    """Mixin of the pipelines: opt-in tiled MoVQ decoding for large images (diffusers' ``enable_vae_tiling``)."""

    decode_tiling: tuple[int, int] | None = None  # (tile, overlap) in latent pixels, or None: whole latents

    def enable_tiled_decode(self, tile: int = 64, overlap: int = 16) -> None:
        """Decode latents in overlapping ``tile``² tiles blended across ``overlap`` (latent pixels; 64 = 512 px):
        the decoder's memory stops growing with the image (1024 px and up), for results that differ slightly from
        the whole-latent decode (per-tile normalisation; see :func:`kandinsky3.models.movq_tiling.decode_tiled`)."""
        check_tiling(tile, overlap)
        self.decode_tiling = (tile, overlap)

    def disable_tiled_decode(self) -> None:
        self.decode_tiling = None


def decode_latents(
    movq: torch.nn.Module, latents: torch.Tensor, slice_size: int | None = 1, tiling: tuple[int, int] | None = None
) -> torch.Tensor:
    """(B, 4, h, w) latents → (B, 3, 8h, 8w) fp32 images in about [−1, 1] on the CPU.

    Decodes ``slice_size`` latents at a time (None = the whole batch) so the 16384-token MoVQ
    attentions of large images never hold a whole batch at once; with ``tiling`` = (tile, overlap)
    each latent is decoded in overlapping tiles (:func:`~kandinsky3.models.movq_tiling.decode_tiled`).
    On the CPU the decoder runs channels-last (oneDNN's native layout: no reordered copies of the
    full-size activations; a third less peak memory at 512 px).
    """
    device, dtype = module_device(movq), compute_dtype(movq)
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    size = latents.shape[0] if not slice_size else slice_size
    images = []
    with torch.inference_mode():
        for chunk in latents.split(size):
            chunk = chunk.to(device, dtype).contiguous(memory_format=layout)
            decoded = movq.decode(chunk) if tiling is None else decode_tiled(movq, chunk, tile=tiling[0],
                                                                              overlap=tiling[1])
            images.append(decoded.float().cpu().contiguous())
    return torch.cat(images)


def encode_images(movq: torch.nn.Module, images: torch.Tensor, slice_size: int | None = 1) -> torch.Tensor:
    """(B, 3, H, W) images in [−1, 1] → (B, 4, H/8, W/8) fp32 latents on the images' device."""
    device, dtype = module_device(movq), compute_dtype(movq)
    size = images.shape[0] if not slice_size else slice_size
    latents = []
    with torch.inference_mode():
        for chunk in images.split(size):
            latents.append(movq.encode(chunk.to(device, dtype)).float().to(images.device))
    return torch.cat(latents)


def to_output(images: torch.Tensor, output_type: str) -> Any:
    """(B, 3, H, W) images in [−1, 1] → list of PIL images, (B, H, W, 3) np.float32 in [0, 1],
    or a (B, 3, H, W) tensor in [0, 1].  8-bit images are rounded, not truncated."""
    images = ((images.float() + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def pil_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB PIL image resized (bicubic) to width×height → (1, 3, height, width) in [−1, 1]."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def make_generators(
    seed: int | None, generator: torch.Generator | Sequence[torch.Generator] | None, count: int
) -> torch.Generator | list[torch.Generator]:
    """The randomness of one call.

    ``seed`` gives image i its own CPU generator seeded ``seed + i``, so a batch of prompts gives
    the same images as the prompts one by one, and the same seed gives the same image on every
    device.  A caller's generator (or list of ``count`` generators) is used as given.  Without
    either, a random seed is drawn and logged.
    """
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if isinstance(generator, (list, tuple)) and len(generator) != count:
            raise ValueError(f"got {len(generator)} generators for {count} images; pass one per image")
        return list(generator) if isinstance(generator, (list, tuple)) else generator
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        logger.info("no seed given; using seed %d", seed)
    return [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(count)]


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator], device: torch.device
) -> torch.Tensor:
    """z ~ N(0, I) fp32 of ``shape``, drawn on the generator's device (per sample for a list)."""
    if isinstance(generator, list):
        return torch.cat([initial_noise((1, *shape[1:]), g, device) for g in generator])
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def batch_slices(total: int, batch_size: int | None) -> list[slice]:
    """Mini-batches of at most ``batch_size`` images (None = one batch)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"bs (images per U-Net batch) must be an int >= 1, got {batch_size!r}")
    size = batch_size or total
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def context_lengths(conditions: TextConditions) -> list[int]:
    """Per image, the context length it would have if encoded alone: 1 + the last real slot of
    its cond or uncond mask, plus the one pad slot (at most the batch's L)."""
    masks = conditions.cond[1] if conditions.uncond is None else conditions.cond[1] | conditions.uncond[1]
    length = masks.shape[1]
    slots = torch.arange(length, device=masks.device)
    last = torch.where(masks, slots, -1).amax(dim=1)  # (B,)
    return [min(length, int(n) + 2) for n in last]


def pool_as_alone(conditions: TextConditions, lengths: list[int]) -> TextConditions:
    """Make each image's pooled text vector the one it has when encoded alone.

    The attention pooling's query is the mean over *all* L context slots, pads included, so an
    image would depend on the longest prompt of its batch.  Slots ≥ L_i of image i (masked for
    every attention) are filled with the mean of its first L_i slots: the mean over L slots then
    equals the mean over its own L_i, and nothing else sees those slots.
    """
    def fill(pair):
        if pair is None:
            return None
        context, mask = pair
        own_length = torch.tensor(lengths, device=context.device)  # (B,)
        own = torch.arange(context.shape[1], device=context.device)[None, :] < own_length[:, None]  # (B, L)
        mean = (context * own[..., None]).sum(dim=1, keepdim=True) / own_length[:, None, None]  # (B, 1, D)
        return torch.where(own[..., None], context, mean.to(context.dtype)), mask & own

    return TextConditions(fill(conditions.cond), fill(conditions.uncond))


def select(generator, indices: list[int]):
    """The generators of some images (a single shared generator is used as is)."""
    return [generator[i] for i in indices] if isinstance(generator, list) else generator


def gather_conditions(conditions: TextConditions, part: slice) -> TextConditions:
    """The conditions of the images in ``part``, cut to the longest context among them."""
    length = max(context_lengths(TextConditions(
        (conditions.cond[0][part], conditions.cond[1][part]),
        None if conditions.uncond is None else (conditions.uncond[0][part], conditions.uncond[1][part]),
    )))

    def pick(pair):
        return None if pair is None else (pair[0][part, :length], pair[1][part, :length])

    return TextConditions(pick(conditions.cond), pick(conditions.uncond))


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def denoise(
    unet: torch.nn.Module,
    conditions: TextConditions,
    start: Callable[[list[int], Any], torch.Tensor],
    *,
    sample_fn: Callable[..., torch.Tensor],
    timesteps: list[int],
    alphas_cumprod: torch.Tensor,
    w: float,
    generators: Any,
    batch_size: int | None,
    sampler_kwargs: dict[str, Any],
    extra_channels: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run the sampler over mini-batches of at most ``batch_size`` images → (B, 4, h, w) latents.

    The latents and the sampler's arithmetic are fp32 whatever the U-Net's dtype (fp64 for an
    fp64 U-Net, which the exactness tests use).

    ``start(indices, generator)`` returns the start latents of those images (noise for
    text-to-image, noised image latents for img2img).  ``extra_channels`` (B, C, h, w) is
    concatenated to x_t at every call (inpainting's keep-mask and masked latent).

    Each image's pooled text vector is the one it has alone (:func:`pool_as_alone`), so a batch
    of prompts gives the images of the prompts one by one.
    """
    device = module_device(unet)
    latent_dtype = torch.promote_types(torch.float32, compute_dtype(unet))  # fp32, or fp64
    conditions = move_conditions(conditions, device)
    conditions = pool_as_alone(conditions, context_lengths(conditions))
    net_call = unet_call(unet, timesteps)
    results = []
    for part in batch_slices(conditions.cond[0].shape[0], batch_size):
        indices = list(range(part.start, part.stop))
        generator = select(generators, indices)
        text = gather_conditions(conditions, part)
        extra = None if extra_channels is None else extra_channels[part].to(device)
        denoiser = guidance.make_cfg_denoiser(net_call, text.cond, text.uncond, w, extra_channels=extra)
        bar = None
        if progress:
            bar = lambda steps: tqdm(steps, total=len(timesteps), desc="denoising", leave=False)  # noqa: E731
        with torch.inference_mode():
            x = start(indices, generator).to(device, latent_dtype)
            results.append(
                sample_fn(
                    denoiser, x, timesteps, alphas_cumprod, generator=generator, callback=callback,
                    progress=bar, **sampler_kwargs,
                )
            )
    return_free_memory()
    return torch.cat(results)


def return_free_memory() -> None:
    """Hand memory freed by a finished phase back to the system: glibc keeps freed blocks of its heaps for reuse,
    where they count as resident and add to the next phase's peak (see benchmarks/pipeline_memory.py)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()
