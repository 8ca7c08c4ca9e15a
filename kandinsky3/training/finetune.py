"""Fine-tune an existing Kandinsky 3 model on your own images: a LoRA (through peft), or every U-Net weight.

Launch (torchrun for several GPUs, as for every trainer: :mod:`.distributed`)::

    kandinsky3 finetune --model tiny --data my_images/ --out my_lora.safetensors [--rank 16] [--steps 1000] ...
    kandinsky3 train configs/lora_tiny.json [--resume] [section.key=value ...]
    torchrun --standalone --nproc_per_node=2 -m kandinsky3.training configs/lora_kandinsky31.json

The images are a folder with ``captions.jsonl`` or ``captions.csv`` (:class:`.image_datasets.FolderDataset`),
center-cropped to ``data.image_size``, or with ``data.resolution_buckets`` to the bucket each step draws.

:func:`finetune` is the whole run, in order:

1. The base model (``model.base``): its frozen MoVQ (fp32) and text encoder.
2. Text, once: T5 runs over every caption and sample prompt in one pass (block by block from its files with
   ``model.stream_t5``, so the 8.6B encoder never shares memory with the U-Net), and its states are cached on disk
   (``text.cache``). T5 is then dropped for a :class:`.text_cache.CachedT5`, a lookup of those states, so the
   U-Net trainer's conditioning (:func:`kandinsky3.conditioning.training_conditions`, the projection included)
   runs unchanged and gives each caption exactly what the pipeline gives that prompt.
3. Latents, once: every image at every training size, encoded by the frozen MoVQ and cached (``data.latent_cache``).
4. The U-Net: frozen base weights in ``model.dtype`` and a fresh fp32 LoRA (:func:`kandinsky3.lora.inject_lora`),
   or with ``lora.rank`` 0 every U-Net weight trained in fp32; ``model.gradient_checkpointing`` recomputes each
   block in the backward pass (:func:`checkpoint_blocks`).
5. The loop: the U-Net trainer's step (:func:`.train_unet.draw_step`, :class:`.train_unet.DiffusionModel`: ε-MSE on
   the cosine schedule, CFG dropout), autocast in ``run.precision``, DDP under torchrun (FSDP2 for full
   fine-tuning with ``run.fsdp``), sample grids
   (``samples/step_XXXXXX.png``) and ``checkpoint.pt`` at their intervals; ``--resume`` continues exactly.
6. The end: the adapter file (EMA weights when ``ema.decay`` > 0, see :mod:`kandinsky3.lora` for the format), or
   for full fine-tuning a native model folder with the base model's MoVQ and text encoder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..components import SamplingDefaults
from ..lora import LoraSpec, base_identity, inject_lora, save_lora
from ..models.text_encoder import TextEncoder, cut_length
from ..models.unet import UNet
from ..weights import Checkpoint, load_movq, load_text_encoder, load_unet, open_checkpoint, write_native
from .checkpoint import cached_file, holds_key, read_checkpoint, restore_training_state
from .config import FinetuneConfig, apply_overrides, config_to_dict, parse_config
from .distributed import (DistributedContext, barrier, cleanup_distributed, full_state_dict, load_optimizer_state,
                          no_sync, setup_distributed, unsharded, wrap_model)
from .ema import EMA, build_ema
from .image_datasets import ImageSource, training_images
from .optim import autocast, build_optimizer, make_grad_scaler, optimizer_step, scheduled_lr, set_lr
from .run_log import EXPORT, RUN_LOG, TrainingLog, check_run_folder, due, prepare_out_dir
from .sample_grids import grid_path, save_image_grid
from .seeding import micro_slices
from .text_cache import CachedT5, t5_states
from .train_unet import DiffusionModel, draw_step, load_trained_state, save_unet_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["finetune", "finetune_config", "checkpoint_blocks", "ADAPTER"]

ADAPTER = "finetune"  # the adapter's name inside the run (the file's keys do not carry it)
LOG_FIELDS = ["loss", "grad_norm", "lr", "ms_per_step"]


def finetune(config: FinetuneConfig, *, resume: bool = False, dataset: Dataset | None = None) -> Path:
    """Run (or, with ``resume``, continue) a fine-tuning run in a new ``run.out_dir`` (or, to resume, one with a
    checkpoint: :func:`.run_log.check_run_folder`); returns the LoRA file (or model folder) written. ``dataset``
    replaces the configured images (tests)."""
    check_run_folder(Path(config.run.out_dir), resume)
    ctx = setup_distributed(config.run.device)
    try:
        out_dir = prepare_out_dir(config, ctx.is_main)
        checkpoint = open_checkpoint(_resolve(config.model.base))
        # text and images, each encoded once: T5 states of every caption and sample prompt, latents of every image
        images = training_images(config.data, dataset)
        captions = images.all_captions()
        prompts = list(config.samples.prompts) or captions[:4]
        text_encoder = cached_text_encoder(config, ctx, checkpoint, [*captions, *prompts])
        movq = load_movq(checkpoint, dtype=torch.float32, device=ctx.device).requires_grad_(False)
        data = training_set(config, ctx, images, text_encoder, movq, str(checkpoint.root))
        movq.cpu()  # until a sample grid needs it: the latents are cached
        # the U-Net: frozen base + LoRA, or all weights trained; the checkpoint of a resumed run
        unet = load_unet(checkpoint, dtype=config.model.dtype, device=ctx.device)
        identity = base_identity(unet, config.model.base)
        spec = prepare_unet(config, unet, text_encoder)
        raw = DiffusionModel(unet, text_encoder, style=checkpoint.conditioning).to(ctx.device)
        state = read_checkpoint(out_dir, config) if resume else None
        if state is not None:  # before wrapping: FSDP shards what the model holds then
            load_trained_state(raw, state["model"])
        model = wrap_model(raw, ctx, fsdp=config.run.fsdp)  # what runs forward and backward; raw is what is saved
        optimizer = build_optimizer(config.optim.name, raw.named_parameters(), config.optim.lr, config.optim.betas,
                                    config.optim.weight_decay)
        scaler = make_grad_scaler(config.run.precision, ctx.device)
        ema = build_ema(raw, config.ema)
        step = 0
        if state is not None:
            load_optimizer_state(model, optimizer, state["optimizer"], config.run.fsdp)
            step = restore_training_state(state, scaler, ema)
        logger.info("fine-tuning %s: %s, %.2fM of %.2fM U-Net weights trained, %d images, %s, %d process(es)",
                    config.model.base, f"LoRA rank {spec.rank} on {', '.join(spec.targets)}" if spec else "full",
                    sum(p.numel() for p in raw.parameters() if p.requires_grad) / 1e6,
                    sum(p.numel() for p in unet.parameters()) / 1e6, len(data), ctx.device, ctx.world_size)
        # the loop
        log = TrainingLog(out_dir / RUN_LOG, LOG_FIELDS, config.run.log_interval, step, ctx.is_main)
        raw.train()
        while step < config.schedule.max_steps:
            log.add(**train_step(config, ctx, step, data, movq, model, raw, optimizer, scaler, ema))
            step += 1
            if log.due(step):
                log.line(step, lr=optimizer.param_groups[0]["lr"])
            if due(step, config.run.sample_interval):
                with ema.swapped(raw) if ema is not None else contextlib.nullcontext(), \
                        unsharded(model, config.run.fsdp and ctx.distributed):
                    write_samples(config, ctx, raw, movq, prompts, checkpoint.conditioning, grid_path(out_dir, step))
            if due(step, config.run.checkpoint_interval):
                save_unet_checkpoint(config, ctx, step, raw, model, optimizer, scaler, ema)
        # the end: a last checkpoint unless the last step wrote one, then the adapter (or model)
        if not due(step, config.run.checkpoint_interval):
            save_unet_checkpoint(config, ctx, step, raw, model, optimizer, scaler, ema)
        with ema.swapped(raw) if ema is not None else contextlib.nullcontext():
            output = export(config, ctx, raw, spec, identity, checkpoint)
        barrier()
        return output
    finally:
        cleanup_distributed()


def _resolve(base: str) -> str | Path:
    from ..pipelines.load import resolve_model

    return resolve_model(base)


# ------------------------------------------------------------------------------------ text and latents, once


def _digest(items: list[str]) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def cached_text_encoder(config: FinetuneConfig, ctx: DistributedContext, checkpoint: Checkpoint,
                        prompts: list[str]) -> TextEncoder:
    """The base's text encoder with T5 replaced by a :class:`.text_cache.CachedT5` of ``prompts`` (fp32 projection,
    frozen).

    T5 runs in bf16 on CUDA (fp32 on the CPU), streamed per ``model.stream_t5``; only rank 0 runs it, and only when
    ``text.cache`` does not already hold these prompts for this base."""
    unique = list(dict.fromkeys(prompts))
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    path = Path(config.text.cache or Path(config.run.out_dir) / "text_cache.pt")
    key = {"base": str(checkpoint.root), "prompts": _digest(unique), "dtype": str(dtype)}
    fresh = ctx.is_main and not holds_key(path, key)
    stream = {"auto": "auto", "yes": True, "no": False}[config.model.stream_t5] if fresh else True
    encoder = load_text_encoder(checkpoint, dtype=dtype, device=ctx.device, stream_t5=stream)
    cache = cached_file(path, key, functools.partial(t5_states, encoder, unique), ctx.is_main)
    encoder.t5 = CachedT5(cache["input_ids"], cache["attention_mask"], cache["states"])  # the T5 weights are freed
    return encoder.float().requires_grad_(False)


@dataclass(frozen=True)
class TrainingSet:
    """Token ids and 0/1 masks (N,n) of every caption and latents (N,4,h,w) on the CPU per training size (None =
    the square ``data.image_size``, else a bucket (height, width))."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    latents: dict[tuple[int, int] | None, torch.Tensor]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def training_set(config: FinetuneConfig, ctx: DistributedContext, images: ImageSource, text_encoder: TextEncoder,
                 movq: nn.Module, base: str) -> TrainingSet:
    """Tokenise every caption and encode every image at every training size once (cached in ``data.latent_cache``,
    default ``<out_dir>/latent_cache.pt``, reused while the base, data section and captions are the same)."""
    captions = images.all_captions()
    ids, mask = text_encoder.tokenize(captions)
    width = cut_length(mask)
    sizes = list(config.data.resolution_buckets) or [None]
    unused = ("latent_cache", "mask_coverage", "object_masks")
    data = {k: v for k, v in config_to_dict(config.data).items() if k not in unused}
    key = {"base": base, "data": data, "captions": _digest(captions)}
    path = Path(config.data.latent_cache or Path(config.run.out_dir) / "latent_cache.pt")

    @torch.no_grad()
    def encode() -> dict:
        latents = []
        for size in sizes:
            height, width = size or (config.data.image_size, config.data.image_size)
            chunk = max(1, min(64, 2**20 // (height * width)))  # one 1024² image at a time, 64 small ones
            parts = [movq.encode(images.batch(torch.arange(i, min(i + chunk, len(images))), size)[0].to(ctx.device))
                     .float().cpu() for i in range(0, len(images), chunk)]
            latents.append(torch.cat(parts))  # (N,4,h,w)
        return {"latents": latents}

    cache = cached_file(path, key, encode, ctx.is_main)
    return TrainingSet(ids[:, :width], mask[:, :width], dict(zip(sizes, cache["latents"])))


# ------------------------------------------------------------------------------------ model


def prepare_unet(config: FinetuneConfig, unet: UNet, text_encoder: TextEncoder) -> LoraSpec | None:
    """Freeze the base and add the run's LoRA (drawn from ``run.seed``, fp32), or unfreeze every U-Net weight
    (``lora.rank`` 0, returns None); then gradient checkpointing when asked."""
    unet.requires_grad_(False)
    spec = None
    if config.lora.rank:
        spec = LoraSpec(config.lora.rank, config.lora.alpha, config.lora.dropout, config.lora.targets)
        with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: the same on every rank
            torch.manual_seed(config.run.seed)
            inject_lora(unet, text_encoder, spec, ADAPTER, trainable=True, dtype=torch.float32)
    else:
        unet.float().requires_grad_(True)
    if config.model.gradient_checkpointing:
        checkpoint_blocks(unet)
    return spec


def checkpoint_blocks(unet: UNet) -> int:
    """Recompute each U-Net block (every level's residual/attention triples and its self-attention block) in the
    backward pass instead of keeping its activations (``torch.utils.checkpoint``, non-reentrant, RNG state
    preserved); returns the number of blocks. Gradients are unchanged; the weights and their names too."""
    from torch.utils.checkpoint import checkpoint

    blocks = [block for level in (*unet.down_samples, *unet.up_samples)
              for block in (*level.resnet_attn_blocks, level.self_attention_block) if block is not None]
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


# ------------------------------------------------------------------------------------ one step


def train_step(config: FinetuneConfig, ctx: DistributedContext, step: int, data: TrainingSet, movq: nn.Module,
               model: nn.Module, raw: DiffusionModel, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, ema: EMA | None) -> dict[str, torch.Tensor | None]:
    """Optimizer step ``step`` over this process's slices of the global batch, then the EMA update; returns the
    step's mean loss and the gradient norm before clipping."""
    set_lr(optimizer, scheduled_lr(step, config.optim.lr, config.schedule))
    draws = draw_step(config, step, len(data), movq, ctx.device)
    slices = micro_slices(config.schedule.batch_size, ctx.rank, ctx.world_size, config.schedule.grad_accum)
    losses = []
    for micro, part in enumerate(slices):
        rows = draws.indices[part]
        x0 = data.latents[draws.size][rows].to(ctx.device)  # (b,4,h,w)
        ids, mask = data.input_ids[rows].to(ctx.device), data.attention_mask[rows].to(ctx.device)
        with no_sync(model, micro < len(slices) - 1):  # gradients are all-reduced on the last micro-batch only
            with autocast(ctx.device, config.run.precision):
                loss = model(x0, ids, mask, draws.t[part], draws.noise[part], draws.drop[part])
            scaler.scale(loss / len(slices)).backward()
        losses.append(loss.detach())
    grad_norm = optimizer_step(optimizer, scaler, raw.parameters(), config.optim.grad_clip)
    if ema is not None:
        ema.update(raw, step)
    return {"loss": torch.stack(losses).mean(), "grad_norm": grad_norm}


# ------------------------------------------------------------------------------------ samples and the result


@torch.no_grad()
def write_samples(config: FinetuneConfig, ctx: DistributedContext, raw: DiffusionModel, movq: nn.Module,
                  prompts: list[str], style: str, path: Path) -> None:
    """One row of sample images (seed 0) with the current weights, through the real pipeline (rank 0; every rank
    under FSDP, whose forward needs all ranks)."""
    from ..pipelines.text_to_image import Kandinsky3Pipeline

    if not (ctx.is_main or config.run.fsdp):
        return
    raw.eval()
    try:
        pipe = Kandinsky3Pipeline(raw.unet, movq.to(ctx.device), raw.text_encoder, conditioning=style)
        size, samples = config.data.image_size, config.samples
        images = pipe(prompts, width=size, height=size, steps=samples.steps, guidance_scale=samples.guidance,
                      sampler=samples.sampler, seed=0, output_type="pt", progress=False)
    finally:
        raw.train()
        movq.cpu()
    if ctx.is_main:
        save_image_grid(images * 2 - 1, len(images), path)


def export(config: FinetuneConfig, ctx: DistributedContext, raw: DiffusionModel, spec: LoraSpec | None,
           identity, checkpoint: Checkpoint) -> Path:
    """Write the adapter file (rank 0), or for full fine-tuning a native model folder: the trained U-Net with the
    base's MoVQ and text encoder, the training size and sample settings as its sampling defaults."""
    out_dir = Path(config.run.out_dir)
    if spec is not None:
        path = Path(config.lora.output or out_dir / "lora.safetensors")
        if ctx.is_main:
            trained = {"steps": config.schedule.max_steps, "batch_size": config.schedule.batch_size,
                       "lr": config.optim.lr, "image_size": config.data.image_size}
            save_lora(path, raw.unet, raw.text_encoder, ADAPTER, spec=spec, base=identity,
                      trigger_words=config.lora.trigger_words, extra={"training": json.dumps(trained)})
        return path
    folder = Path(config.lora.output or out_dir / EXPORT)
    state = full_state_dict(raw.unet)
    if ctx.is_main:
        size, samples = config.data.image_size, config.samples
        defaults = SamplingDefaults(width=size, height=size, guidance_scale=samples.guidance, steps=samples.steps,
                                    sampler=samples.sampler)
        write_native(folder, unet=(raw.unet.config, state), movq=checkpoint, text_encoder=checkpoint,
                     conditioning=checkpoint.conditioning, sampling_defaults=defaults,
                     source=f"fine-tuned from {config.model.base}", overwrite=True)
        logger.info("wrote the fine-tuned model to %s", folder)
    return folder


# ------------------------------------------------------------------------------------ the common case's config


def finetune_config(base: str, data_root: str, output: str, *, run_dir: str = "", rank: int = 16,
                    alpha: float | None = None, targets: tuple[str, ...] = ("attention",), steps: int = 1000,
                    lr: float = 1e-4, batch_size: int = 4, resolution: int | None = None,
                    buckets: tuple[tuple[int, int], ...] = (), trigger_words: tuple[str, ...] = (),
                    sample_prompts: tuple[str, ...] = (), sample_interval: int = 0, checkpoint_interval: int = 500,
                    gradient_checkpointing: bool = False, seed: int = 0, device: str = "auto",
                    overrides: tuple[str, ...] = ()) -> FinetuneConfig:
    """The run config of ``kandinsky3 finetune``: a LoRA of ``rank`` (0 = full fine-tuning) on the images of
    ``data_root``, written to ``output`` (run files in ``run_dir``, default ``<output>.run``).

    ``resolution`` None = the base model's own size. On CUDA the frozen base is held in bf16 and the step runs
    under bf16 autocast; on the CPU everything is fp32. ``overrides`` are ``section.key=value`` pairs."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    half = "bf16" if cuda else "fp32"
    size = resolution or open_checkpoint(_resolve(base)).sampling_defaults.width
    data = {
        "trainer": "finetune",
        "run": {"out_dir": run_dir or f"{output}.run", "seed": seed, "device": device, "precision": half,
                "num_threads": 0, "fsdp": False, "log_interval": 10, "sample_interval": sample_interval,
                "checkpoint_interval": checkpoint_interval},
        "data": {"dataset": "folder", "data_root": str(data_root), "num_samples": 1, "data_seed": 0,
                 "image_size": size, "resolution_buckets": [list(b) for b in buckets], "cache_latents": True,
                 "latent_cache": "", "mask_coverage": [0.05, 0.6]},
        "optim": {"name": "adamw", "lr": lr, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"max_steps": steps, "batch_size": batch_size, "grad_accum": 1, "warmup_steps": min(50, steps)},
        "ema": {"decay": 0.0},
        "model": {"base": base, "dtype": half if rank else "fp32", "stream_t5": "auto",
                  "gradient_checkpointing": gradient_checkpointing},
        "lora": {"rank": rank, "alpha": float(alpha or rank or 1), "dropout": 0.0, "targets": list(targets),
                 "trigger_words": list(trigger_words), "output": str(output)},
        "text": {"cfg_dropout": 0.1, "cache": ""},
        "samples": {"prompts": list(sample_prompts), "steps": 25, "guidance": 3.0, "sampler": "original"},
    }
    return parse_config(apply_overrides(data, overrides))
