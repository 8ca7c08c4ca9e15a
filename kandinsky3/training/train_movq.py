"""Train the MoVQ autoencoder (images (B,3,S,S) in [-1,1] <-> latents (B,4,S/f,S/f)).

Launch (see :mod:`.distributed` for multi-process commands)::

    kandinsky3 train configs/small_movq.json [--resume] [key=value ...]
    torchrun --standalone --nproc_per_node=2 -m kandinsky3.training configs/small_movq.json

Loss per micro-batch: l1·|x̂ − x| + mse·(x̂ − x)² + codebook·VQ, plus, from step ``disc_start``,
λ·hinge_G(D(x̂)) with λ = disc_weight (× the adaptive factor of Esser et al. 2021 when
``disc_adaptive``); the patch discriminator D is trained with the hinge loss on the same images.
The codebook (EMA-updated or straight-through, with dead-code restarts, per ``movq`` config) is
updated once per optimizer step from the encoder outputs of the whole global batch, gathered from
every process in global order, so the codebook does not depend on the number of processes.

Outputs in ``out_dir``: ``config.json``, ``train.log``, ``log.csv`` (l1, mse, psnr, vq, perplexity,
codebook usage, latent std, GAN terms, lr, ms/step), ``samples/step_XXXXXX.png`` (rows: input,
quantised reconstruction, the same with EMA weights, EMA reconstruction without the quantiser),
``checkpoint.pt`` and at the end ``movq.safetensors`` +
``movq_config.json``: the EMA weights with the latent scale normalised (:func:`rescale_latents_`).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.movq import MoVQ, MoVQConfig
from . import data as data_lib
from .config import MoVQRunConfig
from .distributed import (DistributedContext, all_gather_cat, barrier, cleanup_distributed, no_sync,
                          setup_distributed, wrap_model)
from .ema import EMA
from .loop import (CHECKPOINT, CSVLog, Metrics, autocast, load_checkpoint, make_grad_scaler, prepare_out_dir,
                   rng_state, save_checkpoint, save_image_grid, set_lr, set_rng_state, warn_config_changes)
from .losses import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss, psnr, reconstruction_losses
from .optim import build_optimizer, learning_rate

logger = logging.getLogger(__name__)

__all__ = ["train_movq", "load_movq", "save_movq", "rescale_latents_", "MOVQ_WEIGHTS", "MOVQ_CONFIG"]

MOVQ_WEIGHTS, MOVQ_CONFIG = "movq.safetensors", "movq_config.json"
LOG_FIELDS = ["loss", "l1", "mse", "psnr", "vq", "perplexity", "codebook_perplexity", "stale_codes",
              "latent_std", "gan", "gan_weight", "d_loss", "lr", "ms_per_step"]
LATENT_QUANTILE = 0.995  # export: |latent| at this quantile of the data is scaled to 1 (see rescale_latents_)


@dataclass
class MoVQRun:
    """Everything the training loop touches (the unwrapped modules are what gets saved)."""

    config: MoVQRunConfig
    ctx: DistributedContext
    out_dir: Path
    images: Any  # data.MaterializedImages or data.DatasetBatches
    movq: MoVQ
    model: nn.Module  # movq, DDP-wrapped when distributed
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    disc: PatchDiscriminator | None
    disc_model: nn.Module | None
    disc_optimizer: torch.optim.Optimizer | None
    disc_scaler: torch.amp.GradScaler
    step: int = 0


def train_movq(config: MoVQRunConfig, *, resume: bool = False, dataset=None) -> Path:
    """Run (or, with ``resume``, continue) a MoVQ run; returns ``out_dir``. ``dataset`` replaces the
    configured one (tests)."""
    if config.fsdp:
        raise ValueError("the MoVQ run supports DDP only; set fsdp=false")
    ctx = setup_distributed(config.device)
    try:
        run = build_run(config, ctx, dataset)
        if resume:
            restore(run)
        _train_mode(run)
        csv_log = CSVLog(run.out_dir / "log.csv", LOG_FIELDS, run.step) if ctx.is_main else None
        metrics, tick = Metrics(), time.perf_counter()
        while run.step < config.max_steps:
            train_step(run, metrics)
            run.step += 1
            if config.log_interval and run.step % config.log_interval == 0:
                tick = _log(run, metrics, csv_log, tick)
            if ctx.is_main and config.sample_interval and run.step % config.sample_interval == 0:
                save_samples(run)
            if config.checkpoint_interval and run.step % config.checkpoint_interval == 0:
                checkpoint(run)
        if not config.checkpoint_interval or run.step % config.checkpoint_interval:
            checkpoint(run)
        if ctx.is_main:
            export(run)
        barrier()
        return run.out_dir
    finally:
        cleanup_distributed()


def build_run(config: MoVQRunConfig, ctx: DistributedContext, dataset=None) -> MoVQRun:
    out_dir = prepare_out_dir(config, ctx.is_main)
    source = dataset if dataset is not None else data_lib.build_dataset(config)
    images = data_lib.batch_source(source, materialize=dataset is not None or config.dataset == "shapes")
    with torch.random.fork_rng(devices=[]):  # same initial weights on every rank, global RNG untouched
        torch.manual_seed(config.seed)
        movq = MoVQ(config.movq_config).to(ctx.device)
    use_disc = config.disc_start >= 0
    disc = PatchDiscriminator(channels=config.disc_channels, layers=config.disc_layers, seed=config.seed).to(
        ctx.device) if use_disc else None
    optimizer = build_optimizer(config.optimizer, movq.named_parameters(), config.lr, config.betas, config.weight_decay)
    disc_optimizer = build_optimizer(config.optimizer, disc.named_parameters(), config.disc_lr or config.lr,
                                     config.betas, config.weight_decay) if use_disc else None
    ema = EMA(movq, config.ema_decay) if config.ema_decay > 0 else None
    logger.info("MoVQ: %.2fM parameters; %d training images; device %s, %d process(es)",
                sum(p.numel() for p in movq.parameters()) / 1e6, len(images), ctx.device, ctx.world_size)
    return MoVQRun(
        config, ctx, out_dir, images, movq, wrap_model(movq, ctx), ema, optimizer,
        make_grad_scaler(config.precision, ctx.device), disc, wrap_model(disc, ctx) if use_disc else None,
        disc_optimizer, make_grad_scaler(config.precision, ctx.device),
    )


def _train_mode(run: MoVQRun) -> None:
    """Train mode, except the quantiser: its state is updated once per step from the global batch."""
    run.movq.train()
    if run.movq.quantize is not None:
        run.movq.quantize.eval()


def train_step(run: MoVQRun, metrics: Metrics) -> None:
    """One optimizer step (all micro-steps) of the autoencoder, the codebook and the discriminator."""
    cfg, ctx, step = run.config, run.ctx, run.step
    set_lr(run.optimizer, learning_rate(step, cfg.lr, cfg.warmup_steps))
    indices = data_lib.global_batch_indices(cfg.seed, step, cfg.batch_size, len(run.images))
    slices = data_lib.micro_slices(cfg.batch_size, ctx.rank, ctx.world_size, cfg.grad_accum)
    use_disc = run.disc is not None and step >= cfg.disc_start
    reals, fakes, latents = [], [], []
    for micro, part in enumerate(slices):
        images = run.images.batch(indices[part])[0].to(ctx.device, non_blocking=True)
        with no_sync(run.model, micro < len(slices) - 1):
            with autocast(ctx.device, cfg.precision):
                reconstruction, vq_loss, info = run.model(images)
            l1, mse = reconstruction_losses(reconstruction, images)
            rec_loss = cfg.l1_weight * l1 + cfg.mse_weight * mse
            loss = rec_loss + cfg.codebook_weight * vq_loss.float()
            if use_disc:
                gan, gan_weight = _generator_gan_term(run, reconstruction, rec_loss)
                loss = loss + gan_weight * gan
                metrics.add(gan=gan, gan_weight=gan_weight)
                reals.append(images)
                fakes.append(reconstruction.detach())
            run.scaler.scale(loss / len(slices)).backward()
        latents.append(info["latents"].detach().float())
        metrics.add(loss=loss, l1=l1, mse=mse, psnr=psnr(mse), vq=vq_loss, latent_std=info["latents"].std())
        if info["perplexity"] is not None:
            metrics.add(perplexity=info["perplexity"])
    _optimizer_step(run.optimizer, run.scaler, run.movq, cfg.grad_clip)
    if run.movq.quantize is not None:
        _update_codebook(run, torch.cat(latents))
    if use_disc:
        _discriminator_step(run, reals, fakes, metrics)
    if run.ema is not None:
        run.ema.update(run.movq, step)


def _generator_gan_term(run: MoVQRun, reconstruction: torch.Tensor, rec_loss: torch.Tensor):
    """Hinge generator loss through the frozen (unwrapped) discriminator, and its weight λ."""
    cfg = run.config
    run.disc.requires_grad_(False)
    with autocast(run.ctx.device, cfg.precision):
        gan = hinge_g_loss(run.disc(reconstruction).float())
    run.disc.requires_grad_(True)
    weight = torch.tensor(cfg.disc_weight, device=gan.device)
    if cfg.disc_adaptive:
        weight = weight * adaptive_gan_weight(rec_loss, gan, run.movq.decoder.conv_out.weight)
    return gan, weight


def _discriminator_step(run: MoVQRun, reals: list, fakes: list, metrics: Metrics) -> None:
    cfg = run.config
    set_lr(run.disc_optimizer, learning_rate(run.step - cfg.disc_start, cfg.disc_lr or cfg.lr, cfg.warmup_steps))
    for micro, (real, fake) in enumerate(zip(reals, fakes)):
        with no_sync(run.disc_model, micro < len(reals) - 1):
            with autocast(run.ctx.device, cfg.precision):
                logits = run.disc_model(torch.cat([real, fake])).float()  # one call: DDP allows one forward
            d_loss = hinge_d_loss(*logits.chunk(2))
            run.disc_scaler.scale(d_loss / len(reals)).backward()
        metrics.add(d_loss=d_loss)
    _optimizer_step(run.disc_optimizer, run.disc_scaler, run.disc, cfg.grad_clip)


def _optimizer_step(optimizer, scaler, module: nn.Module, grad_clip: float) -> None:
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _update_codebook(run: MoVQRun, local_latents: torch.Tensor) -> None:
    """EMA statistics, EMA codebook and dead-code restarts from the global batch's encoder outputs."""
    quantize = run.movq.quantize
    latents = all_gather_cat(local_latents)  # (B,z,h,w) in global batch order
    generator = data_lib.step_generator(run.config.seed + 1, run.step, run.ctx.device)
    quantize.train()
    quantize(latents.to(quantize.embedding.weight.dtype), generator=generator)
    quantize.eval()


def _log(run: MoVQRun, metrics: Metrics, csv_log: CSVLog | None, tick: float) -> float:
    now = time.perf_counter()
    values = metrics.averages()
    if run.ctx.is_main:
        values["lr"] = run.optimizer.param_groups[0]["lr"]
        values["ms_per_step"] = 1000.0 * (now - tick) / run.config.log_interval
        if run.movq.quantize is not None:
            usage = run.movq.quantize.usage()
            values["codebook_perplexity"], values["stale_codes"] = usage["perplexity"], usage["stale_codes"]
        logger.info("step %d  %s", run.step, "  ".join(f"{k} {v:.4g}" for k, v in values.items()))
        csv_log.write(run.step, values)
    return time.perf_counter()


def checkpoint(run: MoVQRun) -> None:
    """Write ``checkpoint.pt`` (rank 0) with everything :func:`restore` needs."""
    if not run.ctx.is_main:
        return
    state = {
        "step": run.step,
        "config": run.config.to_dict(),
        "model": run.movq.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(run.config.seed, run.step),
        "extra": {},
    }
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    if run.disc is not None:
        state["extra"] = {"disc": run.disc.state_dict(), "disc_optimizer": run.disc_optimizer.state_dict(),
                          "disc_scaler": run.disc_scaler.state_dict()}
    save_checkpoint(run.out_dir / CHECKPOINT, state)


def restore(run: MoVQRun) -> None:
    """Load ``checkpoint.pt`` of ``out_dir`` into the run (start fresh, with a warning, if there is none)."""
    path = run.out_dir / CHECKPOINT
    if not path.is_file():
        logger.warning("--resume: no %s; starting from step 0", path)
        return
    state = load_checkpoint(path)
    warn_config_changes(state["config"], run.config.to_dict())
    run.movq.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    if run.disc is not None and state["extra"]:
        run.disc.load_state_dict(state["extra"]["disc"])
        run.disc_optimizer.load_state_dict(state["extra"]["disc_optimizer"])
        run.disc_scaler.load_state_dict(state["extra"]["disc_scaler"])
    set_rng_state(state["rng"])
    run.step = int(state["step"])
    logger.info("resumed from %s at step %d", path, run.step)


def ema_model(run: MoVQRun) -> MoVQ:
    """A copy of the MoVQ with the EMA weights (frozen parameters and buffers from the live model)."""
    model = copy.deepcopy(run.movq)
    if run.ema is not None:
        run.ema.copy_to(model)
    return model.eval()


@torch.no_grad()
def save_samples(run: MoVQRun, count: int = 8) -> Path:
    """A PNG grid ``samples/step_XXXXXX.png``, rows: inputs; quantised reconstructions with the live and
    with the EMA weights; EMA ``decode(encode(x))`` without the quantiser (what the diffusion pipelines use)."""
    images = run.images.batch(torch.arange(min(count, len(run.images))))[0].to(run.ctx.device)
    run.movq.eval()
    live = run.movq(images)[0]
    averaged_model = ema_model(run)
    averaged = averaged_model(images)[0]
    unquantised = averaged_model.decode(averaged_model.encode(images))
    _train_mode(run)
    path = run.out_dir / "samples" / f"step_{run.step:06d}.png"
    save_image_grid(torch.cat([images, live, averaged, unquantised]), columns=images.shape[0], path=path)
    return path


def export(run: MoVQRun) -> None:
    """``movq.safetensors`` + ``movq_config.json``: EMA weights, latent scale normalised on the data."""
    model = ema_model(run)
    probe = run.images.batch(torch.arange(min(len(run.images), 512)))[0].to(run.ctx.device)
    with torch.no_grad():
        latents = torch.cat([model.encode(chunk) for chunk in probe.split(64)]).float()
    scale = 1.0 / float(torch.quantile(latents.abs().flatten()[:1_000_000], LATENT_QUANTILE))
    rescale_latents_(model, scale)
    logger.info("export: latents scaled by %.4g (std %.4g -> %.4g; |z| q%.3f -> 1)", scale, float(latents.std()),
                float(latents.std()) * scale, LATENT_QUANTILE)
    save_movq(model, run.out_dir)


@torch.no_grad()
def rescale_latents_(movq: MoVQ, scale: float) -> MoVQ:
    """Make the latent space ``scale`` times larger without changing any reconstruction, in place.

    Kandinsky 3 uses no latent scaling factor (SPEC §3.3), and its samplers clip x̂0 to about
    [-1,1] (SPEC §5.4), so the latents must already have that range. The latent z enters the
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


def save_movq(movq: MoVQ, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in movq.state_dict().items()}
    save_file(tensors, str(folder / MOVQ_WEIGHTS), metadata={"format": "pt", "kandinsky3": "movq"})
    (folder / MOVQ_CONFIG).write_text(json.dumps(movq.config.to_dict(), indent=2) + "\n")
    logger.info("saved %s and %s in %s", MOVQ_WEIGHTS, MOVQ_CONFIG, folder)


def load_movq(folder: str | Path, device: torch.device | str = "cpu") -> MoVQ:
    """The MoVQ saved by :func:`save_movq` (a MoVQ run's out_dir), in eval mode, loaded strictly."""
    folder = Path(folder)
    config = MoVQConfig.from_dict(json.loads((folder / MOVQ_CONFIG).read_text()))
    movq = MoVQ(config)
    movq.load_state_dict(load_file(str(folder / MOVQ_WEIGHTS)), strict=True)
    return movq.to(device).eval()
