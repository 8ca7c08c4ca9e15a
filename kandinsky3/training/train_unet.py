"""Train the Kandinsky 3 U-Net, base text-to-image or inpainting, on latents of a frozen MoVQ.

Launch (multi-process commands in :mod:`.distributed`)::

    kandinsky3 train configs/small_unet.json [--resume] [key=value ...]
    kandinsky3 train configs/small_inpainting.json
    torchrun --standalone --nproc_per_node=2 -m kandinsky3.training configs/small_unet.json

One optimizer step s (SPEC §5.1-5.3, §4.5), all random draws for the whole global batch from
``data.step_generator(seed, s)``, each process then taking its slice:

1. x0 = MoVQ latents (B,4,h,w) of the batch images (cached once per dataset index when possible).
2. t ~ U{0..999}, ε ~ N(0, I), drop ~ Bernoulli(cfg_dropout).
3. context, mask = projected T5 states of the captions (:meth:`TextEncoder.encode_tokens`); a
   dropped sample gets ``null_context_like`` (slot 0 = the learned null embedding, mask only there),
   so the null embedding is trained for classifier-free guidance. Every sample sees the context the
   pipeline gives its prompt alone (:meth:`DiffusionModel.conditioning`), so training matches
   inference and no sample depends on the others in its batch (or on the number of processes).
4. x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε on the 1000-step cosine schedule; loss = mean (ε − ε̂)², ε̂ = U-Net(x_t, t, context).

Inpainting (``mode="inpainting"``): the U-Net input is cat[x_t, keep, masked latent] (9 channels,
SPEC §2.9) built by :func:`.masks.inpainting_conditioning` exactly as the inference pipeline does,
with a random 1-3-shape mask per sample (:func:`.masks.random_mask`); the model starts from a base
U-Net GLIDE-style (:func:`glide_init_state`).

Trained: the U-Net, the text projection and the null embedding, and T5 itself only when
``train_text_encoder`` (the small model, which has no pretrained T5). Outputs in ``out_dir``:
``config.json``, ``train.log``, ``log.csv``, ``samples/step_XXXXXX.png`` (EMA weights),
``checkpoint.pt``, ``tokenizer/`` (when trained here) and at the end ``final/``: the EMA weights in
the native layout (:mod:`kandinsky3.weights.native`): ``kandinsky3.json``, ``unet/`` and ``movq/``
(``config.json`` + ``model.safetensors``), ``text_encoder/`` (T5, tokenizer, ``conditioning.safetensors``
with the projection and null embedding).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.schedule import NUM_TRAIN_TIMESTEPS, cosine_alphas_cumprod, q_sample
from ..models.text_encoder import TextEncoder, cut_length
from ..models.unet import UNet
from . import data as data_lib
from .config import UNetRunConfig
from .distributed import (DistributedContext, barrier, cleanup_distributed, full_state_dict, load_optimizer_state,
                          no_sync, optimizer_state, setup_distributed, wrap_model)
from .ema import EMA
from .loop import (CHECKPOINT, CSVLog, Metrics, autocast, load_checkpoint, make_grad_scaler, prepare_out_dir,
                   rng_state, save_checkpoint, set_lr, set_rng_state, warn_config_changes)
from .masks import inpainting_conditioning, random_masks
from .optim import build_optimizer, learning_rate
from .train_movq import load_movq
from .unet_io import build_text_encoder, export_final, glide_init_state, load_init_unet, save_samples

logger = logging.getLogger(__name__)

__all__ = ["train_unet", "DiffusionModel", "glide_init_state"]

LOG_FIELDS = ["loss", "grad_norm", "lr", "ms_per_step"]


class DiffusionModel(nn.Module):
    """U-Net + text encoder as one module, so DDP / FSDP see every trained parameter in one place.

    ``forward`` returns the mean ε-MSE of a micro-batch; all randomness comes in as tensors.
    """

    def __init__(self, unet: UNet, text_encoder: TextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(), persistent=False)

    def conditioning(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, drop: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b,N) ids / 0-1 mask and (b,) bool drop -> context (b,L,C), mask (b,L) bool.

        Each sample gets exactly what the pipeline gives it at inference for its prompt alone
        (SPEC §4.4-4.5): its own context of length d = min(N, n + 1), or for a dropped sample
        ``null_context_like`` of that length. Batching pads to the longest L; masked slots are never
        attended, but the U-Net's pooling query is the *unmasked* mean over all L slots (SPEC §2.3),
        which would make a sample depend on its batch. So the slots past d hold the mean of the
        first d slots: the L-slot mean then equals the d-slot mean, as for the prompt alone.
        """
        length = cut_length(attention_mask)  # T5 never needs the pad columns beyond the cut
        context, mask = self.text_encoder.encode_tokens(input_ids[:, :length], attention_mask[:, :length])
        null_context, null_mask = self.text_encoder.null_context_like(context, mask)
        context = torch.where(drop[:, None, None], null_context, context)  # (b,L,C)
        mask = torch.where(drop[:, None], null_mask, mask)  # (b,L)
        own = (attention_mask.sum(dim=1) + 1).clamp(max=self.text_encoder.max_length)  # (b,) d per sample
        head = torch.arange(context.shape[1], device=context.device)[None, :] < own[:, None]  # (b,L)
        mean = (context * head[..., None]).sum(dim=1, keepdim=True) / own[:, None, None]  # (b,1,C)
        return torch.where(head[..., None], context, mean.to(context.dtype)), mask

    def forward(
        self, x0: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, t: torch.Tensor,
        noise: torch.Tensor, drop: torch.Tensor, extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0, noise (b,4,h,w); ids / mask (b,N) (1 = real token); t (b,) int in [0, 999]; drop (b,) bool
        (True = unconditional); extra (b,5,h,w) inpainting channels [keep, masked latent] or None."""
        context, mask = self.conditioning(input_ids, attention_mask, drop)
        x_t = q_sample(x0, noise, t, self.alphas_cumprod)  # (b,4,h,w)
        unet_input = x_t if extra is None else torch.cat([x_t, extra], dim=1)  # (b,4 or 9,h,w)
        eps = self.unet(unet_input, t, context, mask)
        return F.mse_loss(eps.float(), noise.float())


@dataclass
class TrainingData:
    """Per dataset index: captions' token ids (N,n) and masks, images, latents (N,4,h,w) or None."""

    images: Any  # data.MaterializedImages or data.DatasetBatches
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    latents: torch.Tensor | None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class UNetRun:
    config: UNetRunConfig
    ctx: DistributedContext
    out_dir: Path
    data: TrainingData
    movq: nn.Module
    raw: DiffusionModel  # unwrapped: what gets saved
    model: nn.Module  # raw, wrapped in DDP / FSDP2 when distributed
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0


def train_unet(config: UNetRunConfig, *, resume: bool = False, dataset=None) -> Path:
    """Run (or continue, with ``resume``) a U-Net run; returns ``out_dir``. ``dataset`` replaces the
    configured one (tests)."""
    ctx = setup_distributed(config.device)
    try:
        run = build_run(config, ctx, dataset, resume)
        csv_log = CSVLog(run.out_dir / "log.csv", LOG_FIELDS, run.step) if ctx.is_main else None
        metrics, tick = Metrics(), time.perf_counter()
        run.raw.train()
        while run.step < config.max_steps:
            train_step(run, metrics)
            run.step += 1
            if config.log_interval and run.step % config.log_interval == 0:
                tick = _log(run, metrics, csv_log, tick)
            if config.sample_interval and run.step % config.sample_interval == 0:
                _samples(run)
            if config.checkpoint_interval and run.step % config.checkpoint_interval == 0:
                checkpoint(run)
        if not config.checkpoint_interval or run.step % config.checkpoint_interval:
            checkpoint(run)
        _export(run)
        return run.out_dir
    finally:
        cleanup_distributed()


def build_run(config: UNetRunConfig, ctx: DistributedContext, dataset, resume: bool) -> UNetRun:
    """Data, frozen MoVQ, text encoder, U-Net (fresh, GLIDE-initialised or resumed), wrapper, optimizer, EMA."""
    out_dir = prepare_out_dir(config, ctx.is_main)
    movq = load_movq(config.movq_path, ctx.device).requires_grad_(False)
    source = dataset if dataset is not None else data_lib.build_dataset(config)
    materialize = dataset is not None or config.dataset == "shapes"
    images = data_lib.batch_source(source, materialize)
    captions = images.captions if materialize else data_lib.dataset_captions(source)
    with torch.random.fork_rng(devices=[]):  # identical initial weights on every rank
        torch.manual_seed(config.seed)
        text_encoder = build_text_encoder(config, captions, out_dir, ctx.is_main)
        unet = UNet(config.unet_config)
    if config.init_unet:
        unet.load_state_dict(load_init_unet(config.init_unet, config.unet_config), strict=True)
    raw = DiffusionModel(unet, text_encoder).to(ctx.device)
    data = _prepare_data(config, ctx, images, captions, text_encoder, movq, cache=materialize and config.cache_latents)
    state = _read_checkpoint(out_dir) if resume else None
    if state is not None:
        warn_config_changes(state["config"], config.to_dict())
        _load_trainable(raw, state["model"])
    model = wrap_model(raw, ctx, fsdp=config.fsdp)
    optimizer = build_optimizer(config.optimizer, raw.named_parameters(), config.lr, config.betas, config.weight_decay)
    ema = EMA(raw, config.ema_decay) if config.ema_decay > 0 else None
    scaler = make_grad_scaler(config.precision, ctx.device)
    run = UNetRun(config, ctx, out_dir, data, movq, raw, model, ema, optimizer, scaler)
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"], config.fsdp)
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        run.step = int(state["step"])
        logger.info("resumed from %s at step %d", out_dir / CHECKPOINT, run.step)
    trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    logger.info("U-Net %.2fM parameters, text encoder %.2fM (T5 %s); %.2fM trained; %d samples; %s, %d process(es)",
                _millions(unet), _millions(text_encoder), "trained" if config.train_text_encoder else "frozen",
                trained / 1e6, len(data), ctx.device, ctx.world_size)
    return run


def _millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _prepare_data(config, ctx, images, captions: list[str], text_encoder: TextEncoder, movq,
                  cache: bool) -> TrainingData:
    """Tokenise every caption once; encode every image once when ``cache`` (frozen MoVQ, fixed data)."""
    ids, masks = zip(*(text_encoder.tokenize(captions[i:i + 4096]) for i in range(0, len(captions), 4096)))
    input_ids, attention_mask = torch.cat(ids), torch.cat(masks)  # (N,max_length)
    width = cut_length(attention_mask)  # columns past the longest caption + 1 are never used
    latents = _latent_cache(config, ctx, images, movq) if cache else None
    return TrainingData(images, input_ids[:, :width].to(ctx.device), attention_mask[:, :width].to(ctx.device), latents)


@torch.no_grad()
def _latent_cache(config, ctx, images, movq, chunk: int = 64) -> torch.Tensor:
    """(N,4,h,w) fp32 latents of every dataset image, encoded in fixed chunks (so always the same values).

    Stored in ``latent_cache`` (default ``out_dir/latent_cache.pt``) with a key (MoVQ file, size and
    mtime; data fields) and reused by a resumed run or another run on the same data and MoVQ (the
    inpainting run reads the base run's). Rank 0 encodes, the others read the file (it must be on
    a shared filesystem).
    """
    movq_file = Path(config.movq_path) / "movq.safetensors"
    key = {"movq": str(movq_file.resolve()), "movq_size": movq_file.stat().st_size,
           "movq_mtime": movq_file.stat().st_mtime_ns, "dataset": config.dataset, "num_samples": len(images),
           "data_seed": config.data_seed, "image_size": config.image_size, "data_root": config.data_root}
    path = Path(config.latent_cache) if config.latent_cache else Path(config.out_dir) / "latent_cache.pt"
    if ctx.is_main and not (path.is_file() and torch.load(path, weights_only=True)["key"] == key):
        start = time.perf_counter()
        parts = [movq.encode(images.batch(torch.arange(i, min(i + chunk, len(images))))[0].to(ctx.device)).float()
                 for i in range(0, len(images), chunk)]
        torch.save({"key": key, "latents": torch.cat(parts).cpu()}, path)
        logger.info("encoded %d images to latents in %.1f s (cached in %s)", len(images),
                    time.perf_counter() - start, path)
    barrier()
    return torch.load(path, weights_only=True)["latents"].to(ctx.device)


def train_step(run: UNetRun, metrics: Metrics) -> None:
    """One optimizer step: all micro-steps, clip, step, EMA."""
    cfg, ctx, step = run.config, run.ctx, run.step
    set_lr(run.optimizer, learning_rate(step, cfg.lr, cfg.warmup_steps))
    indices = data_lib.global_batch_indices(cfg.seed, step, cfg.batch_size, len(run.data))
    generator = data_lib.step_generator(cfg.seed, step, ctx.device)
    size = _step_size(cfg, step)
    latent_shape = _latent_shape(run, size)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=generator, device=ctx.device)
    noise = torch.randn((cfg.batch_size, *latent_shape), generator=generator, device=ctx.device)
    drop = torch.rand(cfg.batch_size, generator=generator, device=ctx.device) < cfg.cfg_dropout
    slices = data_lib.micro_slices(cfg.batch_size, ctx.rank, ctx.world_size, cfg.grad_accum)
    for micro, part in enumerate(slices):
        x0, images = _batch(run, indices[part], size)
        rows = indices[part].to(ctx.device)
        ids, mask = run.data.input_ids[rows], run.data.attention_mask[rows]
        extra = _inpainting_channels(run, images, part) if cfg.mode == "inpainting" else None
        with no_sync(run.model, micro < len(slices) - 1):
            with autocast(ctx.device, cfg.precision):
                loss = run.model(x0, ids, mask, t[part], noise[part], drop[part], extra)
            run.scaler.scale(loss / len(slices)).backward()
        metrics.add(loss=loss)
    run.scaler.unscale_(run.optimizer)
    if cfg.grad_clip > 0:
        grads = [p for p in run.raw.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip)
        metrics.add(grad_norm=grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.raw, step)


def _step_size(config: UNetRunConfig, step: int) -> tuple[int, int] | None:
    """(height, width) of step ``step`` when training on resolution buckets (a pure function of the step)."""
    if not config.resolution_buckets:
        return None
    generator = data_lib.step_generator(config.seed + 2, step)
    return config.resolution_buckets[int(torch.randint(len(config.resolution_buckets), (), generator=generator))]


def _latent_shape(run: UNetRun, size: tuple[int, int] | None) -> tuple[int, int, int]:
    factor = run.movq.config.downsample_factor
    height, width = size if size is not None else (run.config.image_size, run.config.image_size)
    return (run.movq.config.z_channels, height // factor, width // factor)


def _batch(run: UNetRun, indices: torch.Tensor,
           size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x0 latents (b,4,h,w) and, for inpainting, the images (b,3,H,W) in [-1,1]."""
    device = run.ctx.device
    need_images = run.config.mode == "inpainting" or run.data.latents is None
    if not need_images:
        images = None
    elif size is not None:
        images = run.data.images.batch(indices, size)[0].to(device)
    else:
        images = run.data.images.batch(indices)[0].to(device)
    if run.data.latents is not None:
        return run.data.latents[indices.to(device)], images
    with torch.no_grad():
        return run.movq.encode(images).float(), images


def _inpainting_channels(run: UNetRun, images: torch.Tensor, part: slice) -> torch.Tensor:
    """(b,5,h,w) [keep, masked latent] with one random mask per global batch position of this slice."""
    cfg = run.config
    generators = [data_lib.sample_generator(cfg.seed, run.step, position) for position in range(part.start, part.stop)]
    repaint = random_masks(images.shape[-2], images.shape[-1], generators, cfg.mask_coverage).to(images.device)
    return inpainting_conditioning(run.movq, images, repaint)


def _log(run: UNetRun, metrics: Metrics, csv_log: CSVLog | None, tick: float) -> float:
    now = time.perf_counter()
    values = metrics.averages()
    if run.ctx.is_main:
        values["lr"] = run.optimizer.param_groups[0]["lr"]
        values["ms_per_step"] = 1000.0 * (now - tick) / run.config.log_interval
        logger.info("step %d  %s", run.step, "  ".join(f"{k} {v:.4g}" for k, v in values.items()))
        csv_log.write(run.step, values)
    return time.perf_counter()


def _samples(run: UNetRun) -> None:
    """Sample grid with the EMA weights (rank 0; every rank under FSDP, whose forward needs all ranks)."""
    if not (run.ctx.is_main or run.config.fsdp):
        return
    run.raw.eval()
    swap = run.ema.swapped(run.raw) if run.ema is not None else contextlib.nullcontext()
    try:
        with swap, _unsharded(run):
            save_samples(run.config, run.raw.unet, run.movq, run.raw.text_encoder, run.data, run.step, run.ctx.is_main)
    finally:
        run.raw.train()


@contextlib.contextmanager
def _unsharded(run: UNetRun):
    """Under FSDP2 the pipeline calls submodules directly, so the root's own parameter shards are gathered
    first (child units gather themselves in their forward hooks)."""
    if not (run.config.fsdp and run.ctx.distributed):
        yield
        return
    run.model.unshard()
    try:
        yield
    finally:
        run.model.reshard()


def _trainable_state(raw: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors of the trained parameters and all buffers (a frozen T5 is reloaded from its folder)."""
    frozen = {name for name, p in raw.named_parameters() if not p.requires_grad}
    return full_state_dict(raw, skip=frozen)


def _load_trainable(raw: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = raw.load_state_dict(state, strict=False)
    frozen = {name for name, p in raw.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise KeyError(f"checkpoint does not match the model: missing {sorted(set(missing) - frozen)[:8]}, "
                       f"unexpected {sorted(unexpected)[:8]}")


def checkpoint(run: UNetRun) -> None:
    """Write ``checkpoint.pt``: trained weights, EMA, optimizer, scaler, step, config, RNG states."""
    model = _trainable_state(run.raw)  # every rank takes part in the gathers under FSDP
    optimizer = optimizer_state(run.model, run.optimizer, run.config.fsdp)
    ema = run.ema.full_state_dict() if run.ema is not None else None
    if run.ctx.is_main:
        state = {"step": run.step, "config": run.config.to_dict(), "model": model, "optimizer": optimizer,
                 "scaler": run.scaler.state_dict(), "rng": rng_state(run.config.seed, run.step)}
        if ema is not None:
            state["ema"] = ema
        save_checkpoint(run.out_dir / CHECKPOINT, state)
    barrier()


def _read_checkpoint(out_dir: Path) -> dict | None:
    path = out_dir / CHECKPOINT
    if not path.is_file():
        logger.warning("--resume: no %s; starting from step 0", path)
        return None
    return load_checkpoint(path)


def _export(run: UNetRun) -> None:
    """``final/``: EMA weights (live weights when ema_decay = 0) in the native layout."""
    if run.ema is not None:
        with run.ema.swapped(run.raw):
            export_final(run.config, run.raw, run.out_dir / "final", run.ctx.is_main)
    else:
        export_final(run.config, run.raw, run.out_dir / "final", run.ctx.is_main)
    barrier()

