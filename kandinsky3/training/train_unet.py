"""Train the Kandinsky 3 U-Net, base text-to-image or inpainting, on latents of a frozen MoVQ.

Launch (multi-process commands in :mod:`.distributed`)::

    kandinsky3 train configs/small_unet.json [--resume] [section.key=value ...]
    kandinsky3 train configs/small_inpainting.json
    torchrun --standalone --nproc_per_node=2 -m kandinsky3.training configs/small_unet.json

:func:`train_unet` is the whole run in the order things happen: processes, data, model, optimizer,
the loop, the final checkpoint and export, teardown. The functions after it are its steps, in the
same order.

One optimizer step s (architecture §5.1-5.3, §4.5), all random draws for the whole global batch
from ``seeding.step_generator(seed, s)``, each process then taking its slice:

1. x0 = MoVQ latents (B,4,h,w) of the batch images (cached once per dataset index when possible).
2. t ~ U{0..999}, ε ~ N(0, I), drop ~ Bernoulli(cfg_dropout).
3. context, mask = projected T5 states of the captions; a dropped sample gets the null context
   (slot 0 = the learned null embedding, mask only there), so the null embedding is trained for
   classifier-free guidance. Every sample gets the context the pipeline gives its prompt alone, by
   the same function (:func:`kandinsky3.conditioning.training_conditions`), so training matches
   inference and no sample depends on the others in its batch (or on the number of processes).
4. x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε on the 1000-step cosine schedule; loss = mean over samples of
   w_t·mean_pixels m·(ε − ε̂)², ε̂ = U-Net(x_t, t, context), w_t = 1 or Min-SNR-γ's min(SNR_t, γ)/SNR_t
   (``loss.min_snr_gamma``), m = 1 or the sample's object-weighted pixel map (``loss.object_weight``,
   :func:`object_pixel_weights`).

Inpainting (``model.mode="inpainting"``): the U-Net input is cat[x_t, keep, masked latent]
(9 channels, architecture §2.9) built by the inference pipeline's function
(:func:`kandinsky3.conditioning.inpainting_channels`), with a random 1-3-shape mask per sample
(:func:`.inpainting_masks.random_mask`), or for a ``data.object_masks`` fraction a mask around one of the
image's objects (:func:`.inpainting_masks.object_mask`); the U-Net starts from a base U-Net GLIDE-style
(:mod:`.initial_models`).

Trained: the U-Net, the text projection and the null embedding, and T5 itself only when
``text.train_t5`` (off in the shipped configs: the small model's T5 is pretrained on the captions alone by
:mod:`.train_text` and stays frozen here, as Kandinsky 3 keeps its Flan-UL2 frozen). A frozen T5 runs once over
the captions and sample prompts before the first step and is looked up after that (:mod:`.text_cache`). The MoVQ
(``model.movq_path``) and the starting U-Net (``model.init_unet``) are read by the project's checkpoint reader, so
they may be any model folder, e.g. a MoVQ run's ``final/`` or ``kandinsky3/assets/tiny/base``. Outputs in
``run.out_dir``: ``config.json``, ``train.log``, ``log.csv``, ``samples/step_XXXXXX.png`` (EMA
weights), ``checkpoint.pt``, ``tokenizer/`` (when trained here) and at the end ``final/``: the EMA
weights as a native model folder (:func:`kandinsky3.weights.native.write_native`) with U-Net, MoVQ
and text encoder, whose manifest records the training size as the model's sampling default.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from ..components import SamplingDefaults
from ..conditioning import inpainting_channels, training_conditions
from ..data.shapes import REACH
from ..diffusion.schedule import NUM_TRAIN_TIMESTEPS, cosine_alphas_cumprod, q_sample
from ..models.movq import MoVQ
from ..models.text_encoder import TextEncoder, cut_length
from ..models.unet import UNet
from ..weights.loading import component_source, load_movq
from ..weights.native import write_native
from .checkpoint import CHECKPOINT, cached_file, read_checkpoint, restore_training_state, save_checkpoint
from .config import UNetTrainConfig
from .distributed import (DistributedContext, barrier, cleanup_distributed, full_state_dict, load_optimizer_state,
                          no_sync, optimizer_state, setup_distributed, unsharded, wrap_model)
from .ema import EMA, build_ema
from .image_datasets import ImageSource, MaterializedImages, object_anchors, training_images
from .initial_models import initial_models
from .inpainting_masks import training_masks
from .optim import autocast, build_optimizer, make_grad_scaler, optimizer_step, scheduled_lr, set_lr
from .run_log import EXPORT, RUN_LOG, TrainingLog, check_run_folder, due, prepare_out_dir
from .sample_grids import grid_path, save_image_grid, unet_samples
from .seeding import global_batch_indices, micro_slices, sample_generator, step_generator
from .text_cache import look_up_t5

logger = logging.getLogger(__name__)

__all__ = ["train_unet", "DiffusionModel", "min_snr_weights", "object_pixel_weights"]

LOG_FIELDS = ["loss", "grad_norm", "lr", "ms_per_step"]


class DiffusionModel(nn.Module):
    """U-Net + text encoder as one module, so DDP / FSDP see every trained parameter in one place.

    ``forward`` returns the mean ε-MSE of a micro-batch; all randomness comes in as tensors.
    """

    def __init__(self, unet: UNet, text_encoder: TextEncoder, style: str = "original", min_snr_gamma: float = 0.0):
        super().__init__()
        self.unet, self.text_encoder, self.style = unet, text_encoder, style  # style: conditioning.CONDITIONING_STYLES
        alphas_cumprod = cosine_alphas_cumprod()
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("loss_weights", min_snr_weights(alphas_cumprod, min_snr_gamma), persistent=False)

    def forward(
        self, x0: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, t: torch.Tensor,
        noise: torch.Tensor, drop: torch.Tensor, extra: torch.Tensor | None = None,
        pixel_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0, noise (b,4,h,w); ids / mask (b,N) (1 = real token); t (b,) int in [0, 999]; drop (b,) bool
        (True = unconditional); extra (b,5,h,w) inpainting channels [keep, masked latent] or None; pixel_weights
        (b,1,h,w) each pixel's weight in its sample's mean, or None (all 1)."""
        context, mask = training_conditions(self.text_encoder, input_ids, attention_mask, drop,
                                            style=self.style)  # (b,L,C), (b,L)
        x_t = q_sample(x0, noise, t, self.alphas_cumprod)  # (b,4,h,w)
        unet_input = x_t if extra is None else torch.cat([x_t, extra], dim=1)  # (b,4 or 9,h,w)
        eps = self.unet(unet_input, t, context, mask)
        error = (eps.float() - noise.float()).square()  # (b,4,h,w)
        if pixel_weights is not None:
            error = error * pixel_weights
        per_sample = error.mean(dim=(1, 2, 3))  # (b,)
        return (per_sample * self.loss_weights[t]).mean()


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """(T,) loss weight of each timestep for ε-prediction: min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 − ᾱ_t)
    (Min-SNR-γ, Hang et al. 2023); all ones for γ = 0."""
    if gamma <= 0:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    return torch.clamp(snr, max=gamma) / snr


def object_pixel_weights(objects: list[tuple[tuple[float, float, float], ...]], height: int, width: int,
                         weight: float) -> torch.Tensor:
    """(b,1,height,width) loss weights of a batch's latent pixels: ``weight`` where a pixel's centre lies within an
    object's reach (a box of half-side ``REACH``·r around its anchor, widened by half a pixel so that every pixel the
    object touches counts), 1 elsewhere, each sample's map then scaled to mean 1. ``objects[i]`` holds sample i's
    (x, y, r) anchors, fractions of the side (:func:`.image_datasets.object_anchors`)."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height  # pixel centres, fractions of the side
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    maps = torch.ones(len(objects), 1, height, width)
    for i, anchors in enumerate(objects):
        for x, y, r in anchors:
            near_x = (xs - x).abs() <= REACH * r + 0.5 / width  # (w,)
            near_y = (ys - y).abs() <= REACH * r + 0.5 / height  # (h,)
            maps[i, 0][near_y[:, None] & near_x[None, :]] = weight
    return maps / maps.mean(dim=(1, 2, 3), keepdim=True)


def train_unet(config: UNetTrainConfig, *, resume: bool = False, dataset: Dataset | None = None) -> Path:
    """Run (or, with ``resume``, continue) a U-Net run; returns ``run.out_dir``, which must hold no earlier run
    (or, to resume, its checkpoint: :func:`.run_log.check_run_folder`). ``dataset`` replaces the configured one
    (tests)."""
    check_run_folder(Path(config.run.out_dir), resume)
    ctx = setup_distributed(config.run.device)
    try:
        out_dir = prepare_out_dir(config, ctx.is_main)
        # data: the images and their captions; the frozen MoVQ that turns images into latents (channels-last:
        # 1.16x (ch=16) to 2.35x (ch=24) faster encoding on CPU, benchmarks/README.md, "movq_layout.py")
        movq = load_movq(config.model.movq_path, dtype=torch.float32, device=ctx.device).requires_grad_(False)
        movq = movq.to(memory_format=torch.channels_last)
        images = training_images(config.data, dataset)
        captions = images.all_captions()
        # model: text encoder and U-Net (the same fresh weights on every rank, or init_unet), then the checkpoint
        unet, text_encoder = initial_models(config, captions, out_dir, ctx.is_main)
        raw = DiffusionModel(unet, text_encoder, min_snr_gamma=config.loss.min_snr_gamma).to(ctx.device)
        prompts = [*captions, *config.samples.prompts]  # a frozen T5 runs once per caption, then is looked up
        t5 = text_encoder.t5 if config.text.train_t5 else look_up_t5(text_encoder, prompts)
        needs_objects = config.data.object_masks or config.loss.object_weight != 1.0
        objects = object_anchors(config.data, dataset) if needs_objects else None
        data = prepare_training_set(config, ctx, images, captions, raw.text_encoder, movq, objects)
        state = read_checkpoint(out_dir, config) if resume else None
        if state is not None:
            load_trained_state(raw, state["model"])
        model = wrap_model(raw, ctx, fsdp=config.run.fsdp)  # what runs forward and backward; raw is what is saved
        # optimizer, loss scaler, EMA
        optim = config.optim
        optimizer = build_optimizer(optim.name, raw.named_parameters(), optim.lr, optim.betas, optim.weight_decay)
        scaler = make_grad_scaler(config.run.precision, ctx.device)
        ema = build_ema(raw, config.ema)
        step = 0
        if state is not None:
            load_optimizer_state(model, optimizer, state["optimizer"], config.run.fsdp)
            step = restore_training_state(state, scaler, ema)
        _describe(config, raw, len(data), ctx)
        # the loop: one optimizer step per iteration, then logs, samples and checkpoints when due
        log = TrainingLog(out_dir / RUN_LOG, LOG_FIELDS, config.run.log_interval, step, ctx.is_main)
        schedule = config.schedule
        raw.train()
        while step < schedule.max_steps:
            set_lr(optimizer, scheduled_lr(step, optim.lr, schedule))
            draws = draw_step(config, step, len(data), movq, ctx.device)
            slices = micro_slices(schedule.batch_size, ctx.rank, ctx.world_size, schedule.grad_accum)
            for micro, part in enumerate(slices):
                x0, ids, mask, extra, weights = micro_batch(config, data, movq, draws, part, ctx.device)
                with no_sync(model, micro < len(slices) - 1):  # gradients are all-reduced on the last one only
                    with autocast(ctx.device, config.run.precision):
                        loss = model(x0, ids, mask, draws.t[part], draws.noise[part], draws.drop[part], extra,
                                     weights)
                    scaler.scale(loss / len(slices)).backward()
                log.add(loss=loss)
            log.add(grad_norm=optimizer_step(optimizer, scaler, raw.parameters(), optim.grad_clip))
            if ema is not None:
                ema.update(raw, step)
            step += 1
            if log.due(step):
                log.line(step, lr=optimizer.param_groups[0]["lr"])
            if due(step, config.run.sample_interval):
                write_samples(config, ctx, raw, model, ema, movq, images, grid_path(out_dir, step))
            if due(step, config.run.checkpoint_interval):
                save_unet_checkpoint(config, ctx, step, raw, model, optimizer, scaler, ema)
        # the end: a last checkpoint unless the last step wrote one, then the EMA weights in the native layout
        if not due(step, config.run.checkpoint_interval):
            save_unet_checkpoint(config, ctx, step, raw, model, optimizer, scaler, ema)
        text_encoder.t5 = t5  # the export writes T5's weights
        with ema.swapped(raw) if ema is not None else contextlib.nullcontext():
            export_model(config, raw, out_dir / EXPORT, ctx.is_main)
        barrier()
        return out_dir
    finally:
        cleanup_distributed()


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class TrainingSet:
    """The training set by dataset index, as the step reads it: token ids and 0/1 masks (N,n) of every caption
    (n = longest caption + EOS), the images, their latents (N,4,h,w) when cached (else None), and where each
    image's objects are ((x, y, r) per object) when inpainting masks are drawn around them or the loss weighs
    them (else None)."""

    images: ImageSource
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    latents: torch.Tensor | None
    objects: list[tuple[tuple[float, float, float], ...]] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def prepare_training_set(config: UNetTrainConfig, ctx: DistributedContext, images: ImageSource, captions: list[str],
                         text_encoder: TextEncoder, movq: MoVQ, objects: list | None = None) -> TrainingSet:
    """Tokenise every caption once; encode every image once when the images are held in memory and
    ``data.cache_latents`` (the MoVQ is frozen and the data fixed)."""
    ids, masks = zip(*(text_encoder.tokenize(captions[i:i + 4096]) for i in range(0, len(captions), 4096)))
    input_ids, attention_mask = torch.cat(ids), torch.cat(masks)  # (N,max_length)
    width = cut_length(attention_mask)  # columns past the longest caption + 1 are never used
    cache = config.data.cache_latents and isinstance(images, MaterializedImages)
    latents = _latent_cache(config, ctx, images, movq) if cache else None
    return TrainingSet(images, input_ids[:, :width].to(ctx.device), attention_mask[:, :width].to(ctx.device), latents,
                       objects)


@torch.no_grad()
def _latent_cache(config: UNetTrainConfig, ctx: DistributedContext, images: ImageSource, movq: MoVQ,
                  chunk: int = 64) -> torch.Tensor:
    """(N,4,h,w) fp32 latents of every dataset image, encoded in fixed chunks (so always the same values).

    Stored in ``data.latent_cache`` (default ``out_dir/latent_cache.pt``) with a key (MoVQ weights file, size
    and mtime; data fields) and reused by a resumed run or another run on the same data and MoVQ (the
    inpainting run reads the base run's). Rank 0 encodes, the others read the file (it must be on
    a shared filesystem).
    """
    movq_file = Path(component_source(config.model.movq_path, "movq").tensors.path)
    data = config.data
    key = {"movq": str(movq_file.resolve()), "movq_size": movq_file.stat().st_size,
           "movq_mtime": movq_file.stat().st_mtime_ns, "dataset": data.dataset, "num_samples": len(images),
           "data_seed": data.data_seed, "image_size": data.image_size, "data_root": data.data_root}
    path = Path(data.latent_cache) if data.latent_cache else Path(config.run.out_dir) / "latent_cache.pt"

    def encode() -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        parts = [movq.encode(images.batch(torch.arange(i, min(i + chunk, len(images))))[0].to(ctx.device)).float()
                 for i in range(0, len(images), chunk)]
        logger.info("encoded %d images to latents in %.1f s", len(images), time.perf_counter() - start)
        return {"latents": torch.cat(parts).cpu()}

    return cached_file(path, key, encode, ctx.is_main)["latents"].to(ctx.device)


# ------------------------------------------------------------------------------------ model


def load_trained_state(raw: DiffusionModel, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's trained weights; only frozen parameters (a frozen T5, reloaded from its folder) may be
    absent from it."""
    missing, unexpected = raw.load_state_dict(state, strict=False)
    frozen = {name for name, p in raw.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise KeyError(f"checkpoint does not match the model: missing {sorted(set(missing) - frozen)[:8]}, "
                       f"unexpected {sorted(unexpected)[:8]}")


def _describe(config: UNetTrainConfig, raw: DiffusionModel, num_samples: int, ctx: DistributedContext) -> None:
    def millions(module: nn.Module, trained_only: bool = False) -> float:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trained_only) / 1e6

    logger.info("U-Net %.2fM parameters, text encoder %.2fM (T5 %s); %.2fM trained; %d samples; %s, %d process(es)",
                millions(raw.unet), millions(raw.text_encoder), "trained" if config.text.train_t5 else "frozen",
                millions(raw, trained_only=True), num_samples, ctx.device, ctx.world_size)


# ------------------------------------------------------------------------------------ one step


class StepDraws(NamedTuple):
    """Everything random about optimizer step ``step``, for the whole global batch of B samples."""

    step: int
    indices: torch.Tensor  # (B,) dataset indices
    size: tuple[int, int] | None  # (height, width) resolution bucket, or None for square data.image_size
    t: torch.Tensor  # (B,) timesteps in [0, 999]
    noise: torch.Tensor  # (B,4,h,w) ε
    drop: torch.Tensor  # (B,) bool, True = the sample is trained unconditionally


def draw_step(config: UNetTrainConfig, step: int, num_samples: int, movq: MoVQ, device: torch.device) -> StepDraws:
    """The draws of step ``step`` over a training set of ``num_samples``, a pure function of (run.seed, step)
    (:mod:`.seeding`)."""
    seed, batch_size = config.run.seed, config.schedule.batch_size
    indices = global_batch_indices(seed, step, batch_size, num_samples)
    generator = step_generator(seed, step, device)
    size = None
    if config.data.resolution_buckets:
        buckets = config.data.resolution_buckets
        size = buckets[int(torch.randint(len(buckets), (), generator=step_generator(seed + 2, step)))]
    height, width = size if size is not None else (config.data.image_size, config.data.image_size)
    factor = movq.config.downsample_factor
    latent_shape = (movq.config.z_channels, height // factor, width // factor)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator, device=device)
    noise = torch.randn((batch_size, *latent_shape), generator=generator, device=device)
    drop = torch.rand(batch_size, generator=generator, device=device) < config.text.cfg_dropout
    return StepDraws(step, indices, size, t, noise, drop)


def micro_batch(config: UNetTrainConfig, data: TrainingSet, movq: MoVQ, draws: StepDraws, part: slice,
                device: torch.device) -> tuple[torch.Tensor, ...]:
    """One micro-batch (global batch positions ``part``): x0 latents (b,4,h,w), token ids and 0/1 masks (b,n),
    for inpainting the extra U-Net channels (b,5,h,w) with one random mask per global batch position (else None),
    and with ``loss.object_weight`` the loss's pixel weights (b,1,h,w) (else None)."""
    indices = draws.indices[part]
    rows = indices.to(device)
    inpainting = config.model.mode == "inpainting"
    images = data.images.batch(indices, draws.size)[0].to(device) if inpainting or data.latents is None else None
    if data.latents is not None:
        x0 = data.latents[rows]
    else:
        with torch.no_grad():
            x0 = movq.encode(images).float()
    objects = [data.objects[i] for i in indices.tolist()] if data.objects is not None else None
    weights = None
    if config.loss.object_weight != 1.0:
        weights = object_pixel_weights(objects, x0.shape[-2], x0.shape[-1], config.loss.object_weight).to(device)
    extra = None
    if inpainting:
        positions = range(part.start, part.stop)
        generators = [sample_generator(config.run.seed, draws.step, position) for position in positions]
        repaint = training_masks(images.shape[-2], images.shape[-1], generators, config.data.mask_coverage,
                                 objects, config.data.object_masks).to(device)
        extra = inpainting_channels(movq, images, repaint)
    return x0, data.input_ids[rows], data.attention_mask[rows], extra, weights


# ------------------------------------------------------------------------------------ samples, checkpoints, export


def write_samples(config: UNetTrainConfig, ctx: DistributedContext, raw: DiffusionModel, model: nn.Module,
                  ema: EMA | None, movq: MoVQ, images: ImageSource, path: Path) -> None:
    """A sample grid with the EMA weights (rank 0; every rank under FSDP, whose forward needs all ranks)."""
    if not (ctx.is_main or config.run.fsdp):
        return
    raw.eval()
    try:
        weights = ema.swapped(raw) if ema is not None else contextlib.nullcontext()
        with weights, unsharded(model, config.run.fsdp and ctx.distributed):
            grid, columns = unet_samples(config, raw.unet, movq, raw.text_encoder, images)
    finally:
        raw.train()
    if ctx.is_main:
        save_image_grid(grid, columns, path)


def save_unet_checkpoint(config: UNetTrainConfig, ctx: DistributedContext, step: int, raw: DiffusionModel,
                         model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                         ema: EMA | None) -> None:
    """``checkpoint.pt`` with full tensors of the trained weights and all buffers (a frozen T5 is reloaded from
    its folder), the EMA and the optimizer state. Every rank takes part in the gathers under FSDP; rank 0 writes."""
    frozen = {name for name, p in raw.named_parameters() if not p.requires_grad}
    weights = full_state_dict(raw, skip=frozen)
    optimizer_full = optimizer_state(model, optimizer, config.run.fsdp)
    ema_full = ema.full_state_dict() if ema is not None else None
    if ctx.is_main:
        save_checkpoint(Path(config.run.out_dir) / CHECKPOINT, step=step, config=config, model=weights,
                        optimizer=optimizer_full, scaler=scaler, ema=ema_full)
    barrier()


def export_model(config: UNetTrainConfig, raw: DiffusionModel, folder: Path, write: bool) -> None:
    """Write the current weights of ``raw`` and the run's MoVQ to ``folder``, a native model folder whose manifest
    records the training size and the sample grids' guidance, sampler and steps as the model's sampling defaults.

    Every rank calls this (gathers under FSDP); only ``write`` (rank 0) writes files.
    """
    unet_state = full_state_dict(raw.unet)
    text_state = full_state_dict(raw.text_encoder)
    if not write:
        return
    size, samples = config.data.image_size, config.samples
    defaults = SamplingDefaults(width=size, height=size, guidance_scale=samples.guidance, steps=samples.steps,
                                sampler=samples.sampler)
    write_native(folder, unet=(raw.unet.config, unet_state), movq=component_source(config.model.movq_path, "movq"),
                 text_encoder=(raw.text_encoder, text_state), conditioning="original", variant=config.model.mode,
                 sampling_defaults=defaults, overwrite=True)
    logger.info("exported the %s model to %s", config.model.mode, folder)
