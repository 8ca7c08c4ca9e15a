"""Train the MoVQ autoencoder (images (B,3,S,S) in [-1,1] <-> latents (B,4,S/f,S/f)).

Launch (multi-process commands in :mod:`.distributed`)::

    kandinsky3 train configs/small_movq.json [--resume] [section.key=value ...]
    torchrun --standalone --nproc_per_node=2 -m kandinsky3.training configs/small_movq.json

:func:`train_movq` is the whole run in the order things happen: processes, data, model, optimizers,
the loop, the final checkpoint and export, teardown. The functions after it are its steps, in the
same order.

A decoder fine-tune (``decoder.finetune_from``, :class:`.config.DecoderFinetuneConfig`) starts from an existing
MoVQ, freezes its encoder, ``quant_conv`` and codebook, and trains the rest on ``decode(encode(x))``, the
unquantised latents the pipelines decode; the latent space, and so every U-Net trained on it, stays valid.

Loss per micro-batch: l1·|x̂ − x| + mse·(x̂ − x)² + codebook·VQ (+ edge·|∇x̂ − ∇x| when
``loss.edge_weight`` > 0, off in the shipped configs), plus, from step ``disc.start``,
λ·hinge_G(D(x̂)) with λ = disc.weight (× the adaptive factor of Esser et al. 2021 when
``disc.adaptive``); the patch discriminator D is trained with the hinge loss on the same images.
The codebook (EMA-updated or straight-through, with dead-code restarts, per the ``model`` config) is
updated once per optimizer step from the encoder outputs of the whole global batch, gathered from
every process in global order, so the codebook does not depend on the number of processes.

Outputs in ``run.out_dir``: ``config.json``, ``train.log``, ``log.csv`` (l1, mse, edge, psnr, vq, perplexity,
codebook usage, latent std, GAN terms, lr, ms/step), ``samples/step_XXXXXX.png``
(:func:`.sample_grids.movq_samples`), ``checkpoint.pt`` and at the end ``final/``: a native model
folder (:func:`kandinsky3.weights.native.write_native`) holding only ``movq/``, the EMA weights with
the latent scale normalised (:func:`rescale_latents_`); a U-Net run's ``model.movq_path`` points there.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from ..components import SamplingDefaults
from ..errors import UsageError
from ..models.movq import MoVQ
from ..weights.loading import load_movq
from ..weights.native import write_native
from .checkpoint import CHECKPOINT, read_checkpoint, restore_training_state, save_checkpoint
from .config import MoVQTrainConfig
from .distributed import (DistributedContext, all_gather_cat, barrier, cleanup_distributed, no_sync,
                          setup_distributed, wrap_model)
from .ema import EMA, build_ema
from .image_datasets import ImageSource, training_images
from .losses import (PatchDiscriminator, adaptive_gan_weight, edge_loss, hinge_d_loss, hinge_g_loss, psnr,
                     reconstruction_losses)
from .optim import autocast, build_optimizer, learning_rate, make_grad_scaler, optimizer_step, scheduled_lr, set_lr
from .run_log import EXPORT, RUN_LOG, TrainingLog, check_run_folder, due, prepare_out_dir
from .sample_grids import grid_path, movq_samples, save_image_grid
from .seeding import global_batch_indices, micro_slices, step_generator

logger = logging.getLogger(__name__)

__all__ = ["train_movq", "rescale_latents_"]

LOG_FIELDS = ["loss", "l1", "mse", "edge", "psnr", "vq", "perplexity", "codebook_perplexity", "stale_codes",
              "latent_std", "gan", "gan_weight", "d_loss", "lr", "ms_per_step"]
LATENT_QUANTILE = 0.995  # export: |latent| at this quantile of the data is scaled to 1 (see rescale_latents_)


class Discriminator(NamedTuple):
    """The patch discriminator and what trains it: the module (unwrapped), the module as DDP runs it, its
    optimizer and its loss scaler."""

    module: PatchDiscriminator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def train_movq(config: MoVQTrainConfig, *, resume: bool = False, dataset: Dataset | None = None) -> Path:
    """Run (or, with ``resume``, continue) a MoVQ run in ``run.out_dir`` (which folders are accepted:
    :func:`.run_log.check_run_folder`) and return that folder. ``dataset`` replaces the configured one (tests)."""
    check_run_folder(Path(config.run.out_dir), resume)
    decoder_only = config.decoder.enabled
    start = starting_movq(config) if decoder_only else None  # a bad path or architecture fails before any write
    ctx = setup_distributed(config.run.device)
    try:
        out_dir = prepare_out_dir(config, ctx.is_main)
        images = training_images(config.data, dataset)
        # model: the same fresh (or starting) weights on every rank, the global RNG untouched; DDP runs `model`,
        # `movq` is saved. Channels-last weights: the convolutions then run in that layout, 1.15x (ch=16) to 1.5x
        # (ch=24) a step on CPU (benchmarks/README.md, "movq_layout.py")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.run.seed)
            movq = MoVQ(config.model).to(ctx.device, memory_format=torch.channels_last)
        if start is not None:
            freeze_latent_space(movq, start)
        model = wrap_model(movq, ctx)
        # optimizers, loss scalers, EMA; the discriminator (when disc.start >= 0) with its own
        optim = config.optim
        optimizer = build_optimizer(optim.name, movq.named_parameters(), optim.lr, optim.betas, optim.weight_decay)
        scaler = make_grad_scaler(config.run.precision, ctx.device)
        disc = build_discriminator(config, ctx) if config.disc.start >= 0 else None
        ema = build_ema(movq, config.ema)
        state = read_checkpoint(out_dir, config) if resume else None
        step = restore(state, movq, optimizer, scaler, disc, ema) if state is not None else 0
        logger.info("MoVQ: %.2fM parameters; %d training images; device %s, %d process(es)",
                    sum(p.numel() for p in movq.parameters()) / 1e6, len(images), ctx.device, ctx.world_size)
        # the loop: one optimizer step of autoencoder, codebook and discriminator per iteration
        log = TrainingLog(out_dir / RUN_LOG, LOG_FIELDS, config.run.log_interval, step, ctx.is_main)
        _train_mode(movq)
        while step < config.schedule.max_steps:
            set_lr(optimizer, scheduled_lr(step, optim.lr, config.schedule))
            gan = disc if disc is not None and step >= config.disc.start else None
            reals, fakes, latents = autoencoder_backward(config, ctx, step, images, movq, model, scaler, gan, log)
            optimizer_step(optimizer, scaler, movq.parameters(), optim.grad_clip)
            if movq.quantize is not None and not decoder_only:
                update_codebook(movq, torch.cat(latents), config.run.seed, step)
            if gan is not None:
                discriminator_step(config, step, gan, reals, fakes, log)
            if ema is not None:
                ema.update(movq, step)
            step += 1
            if log.due(step):
                log.line(step, lr=optimizer.param_groups[0]["lr"], **_codebook_usage(movq))
            if ctx.is_main and due(step, config.run.sample_interval):
                write_samples(movq, ema, images, grid_path(out_dir, step))
            if ctx.is_main and due(step, config.run.checkpoint_interval):
                save_movq_checkpoint(config, step, movq, optimizer, scaler, disc, ema)
        # the end: a last checkpoint unless the last step wrote one, then the EMA weights, latents normalised
        if ctx.is_main and not due(step, config.run.checkpoint_interval):
            save_movq_checkpoint(config, step, movq, optimizer, scaler, disc, ema)
        if ctx.is_main:
            export(movq, ema, images, out_dir / EXPORT, rescale=not decoder_only)
        barrier()
        return out_dir
    finally:
        cleanup_distributed()


# ------------------------------------------------------------------------------------ model


def starting_movq(config: MoVQTrainConfig) -> MoVQ:
    """The MoVQ a decoder fine-tune starts from (``decoder.finetune_from``); its config must equal the run's
    ``model``."""
    folder = config.decoder.finetune_from
    start = load_movq(folder, dtype=torch.float32)
    if start.config != config.model:
        raise UsageError(f"decoder.finetune_from {folder!r} holds a MoVQ whose config differs from the run's "
                         f"model section: {start.config.to_dict()}")
    return start


def freeze_latent_space(movq: MoVQ, start: MoVQ) -> None:
    """Copy the starting weights into ``movq`` and freeze everything that defines the latent space: the encoder,
    ``quant_conv`` and the codebook."""
    movq.load_state_dict(start.state_dict())
    for part in (movq.encoder, movq.quant_conv, movq.quantize):
        if part is not None:
            part.requires_grad_(False)


def build_discriminator(config: MoVQTrainConfig, ctx: DistributedContext) -> Discriminator:
    disc = PatchDiscriminator(channels=config.disc.channels, layers=config.disc.layers, seed=config.run.seed)
    disc = disc.to(ctx.device)
    optim = config.optim
    optimizer = build_optimizer(optim.name, disc.named_parameters(), config.disc.lr or optim.lr, optim.betas,
                                optim.weight_decay)
    return Discriminator(disc, wrap_model(disc, ctx), optimizer, make_grad_scaler(config.run.precision, ctx.device))


def restore(state: dict, movq: MoVQ, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            disc: Discriminator | None, ema: EMA | None) -> int:
    """Load a checkpoint into the run's objects; returns the step to continue from."""
    movq.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if disc is not None and state["extra"]:
        disc.module.load_state_dict(state["extra"]["disc"])
        disc.optimizer.load_state_dict(state["extra"]["disc_optimizer"])
        disc.scaler.load_state_dict(state["extra"]["disc_scaler"])
    return restore_training_state(state, scaler, ema)


def _train_mode(movq: MoVQ) -> None:
    """Train mode, except the quantiser: its state is updated once per step from the global batch."""
    movq.train()
    if movq.quantize is not None:
        movq.quantize.eval()


# ------------------------------------------------------------------------------------ one step


def autoencoder_backward(config: MoVQTrainConfig, ctx: DistributedContext, step: int, images: ImageSource,
                         movq: MoVQ, model: nn.Module, scaler: torch.amp.GradScaler, gan: Discriminator | None,
                         log: TrainingLog) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Forward and backward of every micro-batch of this process in step ``step``. Returns the real and the
    reconstructed images (for the discriminator, when ``gan`` is on) and the encoder outputs (for the codebook)."""
    schedule = config.schedule
    indices = global_batch_indices(config.run.seed, step, schedule.batch_size, len(images))
    slices = micro_slices(schedule.batch_size, ctx.rank, ctx.world_size, schedule.grad_accum)
    reals, fakes, latents = [], [], []
    for micro, part in enumerate(slices):
        x = images.batch(indices[part])[0].to(ctx.device, non_blocking=True)
        with no_sync(model, micro < len(slices) - 1):
            with autocast(ctx.device, config.run.precision):
                reconstruction, vq_loss, info = model(x, quantize=not config.decoder.enabled)
            l1, mse = reconstruction_losses(reconstruction, x)
            rec_loss = config.loss.l1_weight * l1 + config.loss.mse_weight * mse
            if config.loss.edge_weight:
                edge = edge_loss(reconstruction, x)
                rec_loss = rec_loss + config.loss.edge_weight * edge
                log.add(edge=edge)
            loss = rec_loss + config.loss.codebook_weight * vq_loss.float()
            if gan is not None:
                gan_loss, gan_weight = generator_gan_term(config, ctx, movq, gan.module, reconstruction, rec_loss)
                loss = loss + gan_weight * gan_loss
                log.add(gan=gan_loss, gan_weight=gan_weight)
                reals.append(x)
                fakes.append(reconstruction.detach())
            scaler.scale(loss / len(slices)).backward()
        latents.append(info["latents"].detach().float())
        log.add(loss=loss, l1=l1, mse=mse, psnr=psnr(mse), vq=vq_loss, latent_std=info["latents"].std(),
                perplexity=info["perplexity"])
    return reals, fakes, latents


def generator_gan_term(config: MoVQTrainConfig, ctx: DistributedContext, movq: MoVQ, disc: PatchDiscriminator,
                       reconstruction: torch.Tensor, rec_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge generator loss through the frozen (unwrapped) discriminator, and its weight λ."""
    disc.requires_grad_(False)
    with autocast(ctx.device, config.run.precision):
        gan = hinge_g_loss(disc(reconstruction).float())
    disc.requires_grad_(True)
    weight = torch.tensor(config.disc.weight, device=gan.device)
    if config.disc.adaptive:
        weight = weight * adaptive_gan_weight(rec_loss, gan, movq.decoder.conv_out.weight)
    return gan, weight


@torch.no_grad()
def update_codebook(movq: MoVQ, local_latents: torch.Tensor, seed: int, step: int) -> None:
    """EMA statistics, EMA codebook and dead-code restarts from the global batch's encoder outputs."""
    quantize = movq.quantize
    latents = all_gather_cat(local_latents)  # (B,z,h,w) in global batch order
    generator = step_generator(seed + 1, step, local_latents.device)
    quantize.train()
    quantize(latents.to(quantize.embedding.weight.dtype), generator=generator)
    quantize.eval()


def discriminator_step(config: MoVQTrainConfig, step: int, disc: Discriminator, reals: list[torch.Tensor],
                       fakes: list[torch.Tensor], log: TrainingLog) -> None:
    """One optimizer step of the discriminator on the step's real and reconstructed micro-batches."""
    set_lr(disc.optimizer, learning_rate(step - config.disc.start, config.disc.lr or config.optim.lr,
                                         config.schedule.warmup_steps))
    for micro, (real, fake) in enumerate(zip(reals, fakes)):
        with no_sync(disc.model, micro < len(reals) - 1):
            with autocast(real.device, config.run.precision):
                logits = disc.model(torch.cat([real, fake])).float()  # one call: DDP allows one forward
            d_loss = hinge_d_loss(*logits.chunk(2))
            disc.scaler.scale(d_loss / len(reals)).backward()
        log.add(d_loss=d_loss)
    optimizer_step(disc.optimizer, disc.scaler, disc.module.parameters(), config.optim.grad_clip)


def _codebook_usage(movq: MoVQ) -> dict[str, float]:
    if movq.quantize is None:
        return {}
    usage = movq.quantize.usage()
    return {"codebook_perplexity": usage["perplexity"], "stale_codes": usage["stale_codes"]}


# ------------------------------------------------------------------------------------ samples, checkpoints, export


def ema_model(movq: MoVQ, ema: EMA | None) -> MoVQ:
    """A copy of the MoVQ with the EMA weights (frozen parameters and buffers from the live model), in eval mode."""
    model = copy.deepcopy(movq)
    if ema is not None:
        ema.copy_to(model)
    return model.eval()


def write_samples(movq: MoVQ, ema: EMA | None, images: ImageSource, path: Path, count: int = 8) -> None:
    """The sample grid of the first ``count`` dataset images (rank 0)."""
    batch = images.batch(torch.arange(min(count, len(images))))[0].to(next(movq.parameters()).device)
    movq.eval()
    grid = movq_samples(movq, ema_model(movq, ema), batch)
    _train_mode(movq)
    save_image_grid(grid, columns=batch.shape[0], path=path)


def save_movq_checkpoint(config: MoVQTrainConfig, step: int, movq: MoVQ, optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, disc: Discriminator | None, ema: EMA | None) -> None:
    """``checkpoint.pt`` (rank 0): model, EMA, optimizer, and the discriminator with its optimizer in ``extra``."""
    extra = {}
    if disc is not None:
        extra = {"disc": disc.module.state_dict(), "disc_optimizer": disc.optimizer.state_dict(),
                 "disc_scaler": disc.scaler.state_dict()}
    save_checkpoint(Path(config.run.out_dir) / CHECKPOINT, step=step, config=config, model=movq.state_dict(),
                    optimizer=optimizer.state_dict(), scaler=scaler, ema=ema.state_dict() if ema is not None else None,
                    extra=extra)


def export(movq: MoVQ, ema: EMA | None, images: ImageSource, folder: Path, *, rescale: bool = True) -> None:
    """A native model folder with the MoVQ alone: EMA weights, latent scale normalised on the data (unless
    ``rescale`` is False: a decoder fine-tune keeps its starting latent space), the training size as the
    sampling default."""
    model = ema_model(movq, ema)
    if rescale:
        probe = images.batch(torch.arange(min(len(images), 512)))[0].to(next(movq.parameters()).device)
        with torch.no_grad():
            latents = torch.cat([model.encode(chunk) for chunk in probe.split(64)]).float()
        scale = 1.0 / float(torch.quantile(latents.abs().flatten()[:1_000_000], LATENT_QUANTILE))
        rescale_latents_(model, scale)
        logger.info("export: latents scaled by %.4g (std %.4g -> %.4g; |z| q%.3f -> 1)", scale,
                    float(latents.std()), float(latents.std()) * scale, LATENT_QUANTILE)
    size = model.config.resolution
    write_native(folder, movq=model, sampling_defaults=SamplingDefaults(width=size, height=size), overwrite=True)
    logger.info("exported the MoVQ to %s", folder)


@torch.no_grad()
def rescale_latents_(movq: MoVQ, scale: float) -> MoVQ:
    """Make the latent space ``scale`` times larger without changing any reconstruction, in place.

    Kandinsky 3 uses no latent scaling factor (architecture §3.3), and its samplers clip x̂0 to about
    [-1,1] (architecture §5.4), so the latents must already have that range. The latent z enters the
    decoder only linearly (post_quant_conv and every SpatialNorm's 1×1 conv_y / conv_b, after a
    nearest resize), so: quant_conv and the codebook are multiplied by ``scale``, those decoder
    weights divided by it. encode -> decode and the quantised forward are unchanged.
    """
    movq.quant_conv.weight.mul_(scale)
    movq.quant_conv.bias.mul_(scale)
    movq.post_quant_conv.weight.div_(scale)
    for module in movq.decoder.modules():
        if hasattr(module, "conv_y") and hasattr(module, "conv_b"):
            module.conv_y.weight.div_(scale)
            module.conv_b.weight.div_(scale)
    if movq.quantize is not None:
        movq.quantize.embedding.weight.mul_(scale)
        movq.quantize.embed_sum.mul_(scale)
    return movq
