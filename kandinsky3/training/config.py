"""Run configs of the trainers: nested frozen dataclasses, parsed once from JSON.

A config file holds one object per section, and every key of every section must be present, except the
few added after the first configs were written: those have a default that is the behaviour from before
they existed and never changes (``schedule.lr_decay``, ``schedule.min_lr_ratio``, the U-Net run's ``loss``
section, the MoVQ run's ``decoder`` section). Loading names each unknown and each missing key (as
``section.key``), so a file describes its run completely and a later change never changes what an old file
means. The trainer is named by
``"trainer"``::

    {"trainer": "unet", "run": {...}, "data": {...}, "optim": {...}, "schedule": {...}, "ema": {...},
     "model": {...}, "text": {...}, "samples": {...}}                                -> UNetTrainConfig
    {"trainer": "movq", "run": {...}, "data": {...}, "optim": {...}, "schedule": {...}, "ema": {...},
     "model": {MoVQConfig}, "loss": {...}, "disc": {...}[, "decoder": {...}]}        -> MoVQTrainConfig
    {"trainer": "finetune", "run": {...}, "data": {...}, "optim": {...}, "schedule": {...}, "ema": {...},
     "model": {...}, "lora": {...}, "text": {...}, "samples": {...}}                 -> FinetuneConfig
    {"trainer": "text", "run": {...}, "data": {...}, "optim": {...}, "schedule": {...}, "ema": {...},
     "text": {...}}                                                                  -> TextTrainConfig
    {"trainer": "recipe", "notes": [...], "common": {...}, "stages": [{...}, ...]}   -> recipe_stages

Model architectures are the ``to_dict`` form of :class:`~kandinsky3.models.unet_config.UNetConfig`
(``model.unet``) and :class:`~kandinsky3.models.movq.MoVQConfig` (the MoVQ run's ``model``).
Command-line overrides are ``section.key=value`` pairs (:func:`apply_overrides`); the value is
parsed as JSON when it parses (numbers, booleans, lists) and is a string otherwise, and
``model.unet.model_channels=64`` reaches into the architecture.

Batch sizes are *global*: ``schedule.batch_size`` samples per optimizer step, summed over all
processes and accumulation micro-steps, so a run gives the same result on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.shapes import AND_ORDERS, P_AND
from ..models.movq import MoVQConfig
from ..models.unet_config import UNetConfig
from .ema import WARMUP_POWER

__all__ = [
    "RunConfig",
    "DataConfig",
    "UNetDataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "EMAConfig",
    "UNetModelConfig",
    "TextConfig",
    "SamplesConfig",
    "MoVQLossConfig",
    "DiffusionLossConfig",
    "DiscriminatorConfig",
    "DecoderFinetuneConfig",
    "UNetTrainConfig",
    "MoVQTrainConfig",
    "FinetuneConfig",
    "FinetuneModelConfig",
    "LoraTrainConfig",
    "FinetuneTextConfig",
    "TextModelConfig",
    "TextTrainConfig",
    "TrainConfig",
    "parse_config",
    "load_config",
    "config_to_dict",
    "save_config",
    "apply_overrides",
    "recipe_stages",
    "load_run_configs",
]


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {choices}, got {value!r}")


def _at_least(section: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(section, name) < minimum:
            raise ValueError(f"{type(section).__name__}.{name} must be >= {minimum}, got {getattr(section, name)}")


# ------------------------------------------------------------------------------------ sections


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where a run writes, how it is seeded, where and how it computes, how often it reports."""

    out_dir: str
    seed: int  # seeds the initial weights and every random draw of the run (training.seeding)
    device: str  # "auto" = cuda:LOCAL_RANK when CUDA is available, else cpu; or "cpu" / "cuda"
    precision: str  # autocast dtype "fp32" | "bf16" | "fp16" (fp16 needs CUDA and uses a GradScaler)
    num_threads: int  # torch.set_num_threads at the entry point; 0 = leave the default
    fsdp: bool  # shard with FSDP2 instead of DDP (U-Net runs and full fine-tuning, for the 3B model)
    log_interval: int  # optimizer steps between log lines (and log.csv rows); 0 = never
    sample_interval: int  # optimizer steps between sample grids; 0 = never
    checkpoint_interval: int  # optimizer steps between checkpoints; 0 = only at the end

    def __post_init__(self) -> None:
        _choice("run.device", self.device, ("auto", "cpu", "cuda"))
        _choice("run.precision", self.precision, ("fp32", "bf16", "fp16"))
        _at_least(self, 0, "num_threads", "log_interval", "sample_interval", "checkpoint_interval")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The images: the synthetic shapes set (num_samples, data_seed) or a folder (data_root)."""

    dataset: str  # "shapes" | "folder" (images + captions.jsonl / captions.csv, image_datasets.FolderDataset)
    data_root: str  # the folder, for dataset="folder"
    num_samples: int  # shapes: number of images
    data_seed: int  # shapes: seed of the scenes
    image_size: int  # square side in pixels
    # shapes: share of two-object scenes captioned "X and Y" instead of by their relation ("X above Y"); the
    # default is the caption grammar's own, which the evaluation prompts keep. Captions only: the images, and so
    # a latent cache, do not change with it
    and_captions: float = P_AND
    # shapes: object order of the "X and Y" captions that state no positions: "any" (either object may be on
    # either side) or "reading" (the left or top one first, so the caption fixes the layout). Captions only; a
    # folder dataset's captions are its own and do not read it (the shipped shapes configs set it)
    and_order: str = "any"

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, ("shapes", "folder"))
        if self.dataset == "folder" and not self.data_root:
            raise ValueError("data.dataset='folder' needs data.data_root (images and captions.jsonl/.csv)")
        _at_least(self, 1, "num_samples", "image_size")
        if not 0.0 <= self.and_captions <= 1.0:
            raise ValueError(f"data.and_captions must be in [0, 1], got {self.and_captions}")
        if self.dataset != "shapes" and self.and_captions != P_AND:
            raise ValueError("data.and_captions sets the shapes set's captions; a folder dataset has its own")
        _choice("data.and_order", self.and_order, AND_ORDERS)


@dataclass(frozen=True, kw_only=True)
class UNetDataConfig(DataConfig):
    """Images of a U-Net run, with its latent cache, resolution buckets and inpainting masks."""

    # (height, width) sizes for mixed-resolution training (folder data): each step draws one bucket from its
    # step generator and crops every image of the global batch to it; [] = square image_size
    resolution_buckets: tuple[tuple[int, int], ...]
    cache_latents: bool  # encode each dataset image once (frozen MoVQ); in-memory (shapes) data only
    latent_cache: str  # cache file; "" = <out_dir>/latent_cache.pt (reused when its key matches)
    mask_coverage: tuple[float, float]  # inpainting: range of the repaint-area fraction of the random masks
    # inpainting: fraction of the masks drawn around one whole object of the image (shapes data, which knows
    # where its objects are) instead of random shapes (training.inpainting_masks)
    object_masks: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution_buckets and self.dataset != "folder":
            raise ValueError("data.resolution_buckets need dataset='folder' (the shapes set renders one size)")
        if any(min(bucket) < 1 for bucket in self.resolution_buckets):
            raise ValueError(f"data.resolution_buckets must be positive (height, width) pairs, "
                             f"got {self.resolution_buckets}")
        low, high = self.mask_coverage
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"data.mask_coverage must satisfy 0 < low <= high < 1, got {self.mask_coverage}")
        if not 0.0 <= self.object_masks <= 1.0:
            raise ValueError(f"data.object_masks must be in [0, 1], got {self.object_masks}")
        if self.object_masks and self.dataset != "shapes":
            raise ValueError("data.object_masks needs dataset='shapes' (a folder dataset does not say where its "
                             "objects are)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer (training.optim) and gradient clipping."""

    name: str  # "adamw" | "lion"
    lr: float  # peak learning rate, reached after schedule.warmup_steps
    betas: tuple[float, float]
    weight_decay: float  # decoupled; on matrices and conv kernels only (optim.param_groups)
    grad_clip: float  # max global gradient norm; 0 disables clipping

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "lion"))
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"optim needs lr > 0, weight_decay >= 0, grad_clip >= 0; got {self.lr}, "
                             f"{self.weight_decay}, {self.grad_clip}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """How long a run is and how each optimizer step's global batch is cut."""

    max_steps: int  # optimizer steps of the whole run
    batch_size: int  # global batch per optimizer step (all processes and micro-steps together)
    grad_accum: int  # accumulation micro-steps per optimizer step, per process
    warmup_steps: int  # linear learning-rate warm-up from 0 (optim.learning_rate)
    lr_decay: str = "constant"  # after the warm-up: "constant", or "cosine" down to min_lr_ratio·lr at max_steps
    min_lr_ratio: float = 0.1  # the cosine decay's final fraction of optim.lr

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_steps", "batch_size", "grad_accum")
        _at_least(self, 0, "warmup_steps")
        _choice("schedule.lr_decay", self.lr_decay, ("constant", "cosine"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"schedule.batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")


@dataclass(frozen=True, kw_only=True)
class EMAConfig:
    """The exponential moving average of the trained weights (training.ema), which the run exports."""

    decay: float  # 0 disables the EMA copy; the cap on the warm-up of training.ema.ema_decay_at
    power: float = WARMUP_POWER  # the warm-up (1+s)/(s+power+2): weights ~ s**power until it reaches decay

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")
        if not (math.isfinite(self.power) and self.power >= 0.0):
            raise ValueError(f"ema.power must be a number >= 0, got {self.power}")


@dataclass(frozen=True, kw_only=True)
class UNetModelConfig:
    """The U-Net trained, where it starts from, and the frozen MoVQ whose latents it learns."""

    mode: str  # "base" | "inpainting" (9 input channels, GLIDE init from init_unet)
    unet: UNetConfig
    movq_path: str  # the frozen MoVQ: any model folder holding one (a MoVQ run's out_dir/final), or a MoVQ folder
    init_unet: str  # start from the U-Net of this model folder (or U-Net folder / file); "" = fresh weights

    def __post_init__(self) -> None:
        _choice("model.mode", self.mode, ("base", "inpainting"))
        channels = 9 if self.mode == "inpainting" else 4
        if self.unet.num_channels != channels:
            raise ValueError(f"model.mode {self.mode!r} needs model.unet.num_channels={channels}, "
                             f"got {self.unet.num_channels}")
        if not self.movq_path:
            raise ValueError("model.movq_path must name a model folder with a MoVQ (e.g. a MoVQ run's final/)")
        if self.mode == "inpainting" and not self.init_unet:
            raise ValueError("model.mode='inpainting' needs model.init_unet: the base U-Net folder to start from")


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The text encoder: a pretrained folder, or a fresh T5 with a tokenizer trained on the captions.

    ``encoder_path``: a T5 folder (weights + tokenizer), or a model folder (a previous run's export)
    whose ``text_encoder/`` adds the trained projection and null embedding. ``t5_config``:
    ``transformers.T5Config`` fields of a fresh T5 whose tokenizer is read from ``tokenizer_dir`` or,
    when that folder has none, trained on the dataset captions.
    """

    encoder_path: str  # exactly one of encoder_path and t5_config is given
    t5_config: dict
    tokenizer_dir: str  # fresh T5 only; "" = <out_dir>/tokenizer
    tokenizer_vocab_size: int  # upper bound of the trained tokenizer's vocabulary
    max_length: int  # token slots per prompt incl. EOS (architecture §4.2)
    train_t5: bool  # False = T5 frozen, as in the report; the projection and null embedding always train
    cfg_dropout: float  # probability that a sample's context becomes the null context (architecture §4.5)

    def __post_init__(self) -> None:
        if bool(self.encoder_path) == bool(self.t5_config):
            raise ValueError("give exactly one of text.encoder_path (pretrained) and text.t5_config (fresh T5)")
        _at_least(self, 1, "tokenizer_vocab_size", "max_length")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"text.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclass(frozen=True, kw_only=True)
class SamplesConfig:
    """The sample grids written every run.sample_interval steps with the EMA weights and the real pipeline."""

    prompts: tuple[str, ...]  # base: one image per prompt; inpainting: one row per dataset image (at most this many)
    steps: int
    guidance: float
    sampler: str


@dataclass(frozen=True, kw_only=True)
class DiffusionLossConfig:
    """How the U-Net run weighs each sample's ε-MSE: by its timestep, and inside the image by what each pixel shows."""

    # Min-SNR-γ (Hang et al. 2023): weight min(SNR_t, γ) / SNR_t, which damps the nearly noise-free timesteps
    # whose gradients conflict with the rest; 0 = every timestep weighs 1 (plain ε-MSE)
    min_snr_gamma: float = 0.0
    # weight of the latent pixels an object covers (its reach box, training.train_unet.object_pixel_weights)
    # against 1 for the rest, each sample's map scaled to mean 1; 1 = every pixel weighs the same. Needs a dataset
    # that says where its objects are (the shapes set)
    object_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.min_snr_gamma < 0:
            raise ValueError(f"loss.min_snr_gamma must be >= 0 (0 = off), got {self.min_snr_gamma}")
        if not self.object_weight > 0:
            raise ValueError(f"loss.object_weight must be > 0 (1 = off), got {self.object_weight}")


@dataclass(frozen=True, kw_only=True)
class MoVQLossConfig:
    """Weights of the reconstruction terms:
    l1·|x̂ − x| + mse·(x̂ − x)² + edge·|∇x̂ − ∇x| + codebook·VQ."""

    l1_weight: float
    mse_weight: float
    codebook_weight: float
    edge_weight: float = 0.0  # L1 between neighbour differences (training.losses.edge_loss); 0 = off

    def __post_init__(self) -> None:
        _at_least(self, 0, "l1_weight", "mse_weight", "codebook_weight", "edge_weight")


@dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig:
    """The patch discriminator of the MoVQ run (training.losses.PatchDiscriminator) and its GAN term."""

    start: int  # optimizer step at which it switches on; -1 = never
    weight: float  # generator GAN weight (times the adaptive factor when adaptive)
    adaptive: bool  # Esser et al. 2021: balance GAN and reconstruction gradients at the decoder's last layer
    lr: float  # 0 = optim.lr
    channels: int
    layers: int

    def __post_init__(self) -> None:
        _at_least(self, -1, "start")
        _at_least(self, 1, "channels", "layers")


@dataclass(frozen=True, kw_only=True)
class DecoderFinetuneConfig:
    """A MoVQ run that trains the decoder alone, on the latents the pipelines decode.

    ``finetune_from``: a model folder holding a MoVQ ("" = a fresh MoVQ, every part trained). When set, the run
    starts from those weights, freezes the encoder, ``quant_conv`` and the codebook, and trains ``post_quant_conv``
    and the decoder on ``decode(encode(x))``: the unquantised latents a U-Net samples, where a full run decodes
    codebook entries. The latent space is left exactly as it was (no rescaling at export), so U-Nets trained on
    the starting MoVQ's latents stay valid.
    """

    finetune_from: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.finetune_from)


# ------------------------------------------------------------------------------------ run configs


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The sections every run config has; each trainer's config adds its own after them."""

    trainer: str  # a key of TRAINERS
    run: RunConfig
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    ema: EMAConfig

    def __post_init__(self) -> None:
        _choice("trainer", self.trainer, tuple(name for name, cls in TRAINERS.items() if cls is type(self)))


@dataclass(frozen=True, kw_only=True)
class UNetTrainConfig(TrainConfig):
    """A diffusion run (training.train_unet): ε-MSE on the 1000-step cosine schedule, CFG dropout."""

    data: UNetDataConfig
    model: UNetModelConfig
    text: TextConfig
    samples: SamplesConfig
    loss: DiffusionLossConfig = DiffusionLossConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss.object_weight != 1.0 and self.data.dataset != "shapes":
            raise ValueError("loss.object_weight needs dataset='shapes' (a folder dataset does not say where its "
                             "objects are)")


@dataclass(frozen=True, kw_only=True)
class MoVQTrainConfig(TrainConfig):
    """An autoencoder run (training.train_movq): reconstruction + VQ loss, optional patch GAN."""

    model: MoVQConfig
    loss: MoVQLossConfig
    disc: DiscriminatorConfig
    decoder: DecoderFinetuneConfig = DecoderFinetuneConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run.fsdp:
            raise ValueError("run.fsdp: the MoVQ trainer supports DDP only")
        if self.model.resolution != self.data.image_size:
            raise ValueError(f"model.resolution {self.model.resolution} != data.image_size {self.data.image_size}")


@dataclass(frozen=True, kw_only=True)
class FinetuneModelConfig:
    """The model a fine-tuning run starts from, and how its frozen parts are held."""

    base: str  # "tiny", a model folder in any layout, or a Hub repo id
    dtype: str  # storage dtype of the frozen U-Net weights under LoRA: "fp32" | "bf16" | "fp16" (full: "fp32")
    stream_t5: str  # "auto" | "yes" | "no": run T5 block by block from its files in the one pass over the captions
    gradient_checkpointing: bool  # recompute each U-Net block in the backward pass: less memory, ~30 % more time

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        _choice("model.stream_t5", self.stream_t5, ("auto", "yes", "no"))


@dataclass(frozen=True, kw_only=True)
class LoraTrainConfig:
    """The adapter a fine-tuning run trains (kandinsky3.lora); rank 0 = full fine-tuning of every U-Net weight."""

    rank: int
    alpha: float  # the adapter's update is scaled by alpha / rank
    dropout: float
    targets: tuple[str, ...]  # kandinsky3.lora.TARGET_GROUPS: "attention", "resnet", "text_projection"
    trigger_words: tuple[str, ...]  # recorded in the file's metadata
    output: str  # the LoRA file (a model folder for rank 0); "" = <out_dir>/lora.safetensors (<out_dir>/final)

    def __post_init__(self) -> None:
        from ..lora import LoraSpec

        _at_least(self, 0, "rank")
        if self.rank:
            LoraSpec(self.rank, self.alpha, self.dropout, self.targets)  # raises on bad values


@dataclass(frozen=True, kw_only=True)
class FinetuneTextConfig:
    """The captions' conditioning: T5 runs once over every caption and sample prompt, its states cached."""

    cfg_dropout: float  # probability that a sample trains unconditionally (architecture §4.5)
    cache: str  # the cached T5 states; "" = <out_dir>/text_cache.pt (reused while its key matches)

    def __post_init__(self) -> None:
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"text.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainConfig):
    """A fine-tuning run (training.finetune): a LoRA, or every U-Net weight, from an existing model on your images.

    ``data`` is the U-Net run's section (``mask_coverage`` and ``object_masks`` unused); latents are always cached."""

    data: UNetDataConfig
    model: FinetuneModelConfig
    lora: LoraTrainConfig
    text: FinetuneTextConfig
    samples: SamplesConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora.rank == 0 and self.model.dtype != "fp32":
            raise ValueError("full fine-tuning (lora.rank 0) trains fp32 weights: set model.dtype to 'fp32'")
        if self.run.fsdp and self.lora.rank:
            raise ValueError("run.fsdp shards full fine-tuning (lora.rank 0); a LoRA run trains a few MB and uses DDP")


@dataclass(frozen=True, kw_only=True)
class TextModelConfig:
    """The T5 encoder of a text pretraining run (its tagging heads are not exported)."""

    t5_config: dict  # transformers.T5Config fields of the encoder, as a U-Net run's text.t5_config
    tokenizer_dir: str  # "" = <out_dir>/tokenizer, trained on the dataset captions when that folder has none
    tokenizer_vocab_size: int
    max_length: int  # token slots per caption incl. EOS, as the U-Net run's text.max_length
    tag_background: bool = False  # also tag every word with the caption's background colour (training.train_text)

    def __post_init__(self) -> None:
        if not self.t5_config:
            raise ValueError("text.t5_config must give the T5 encoder's fields (d_model, num_layers, ...)")
        _at_least(self, 1, "tokenizer_vocab_size", "max_length")


@dataclass(frozen=True, kw_only=True)
class TextTrainConfig(TrainConfig):
    """A text-only run (training.train_text): a fresh T5 encoder learns which object each caption word describes."""

    text: TextModelConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.dataset != "shapes":
            raise ValueError("the text trainer tags shapes captions (data.dataset='shapes'), got "
                             f"{self.data.dataset!r}")
        if self.run.fsdp or self.schedule.grad_accum != 1:
            raise ValueError("the text trainer runs in one process without accumulation: run.fsdp false, "
                             "schedule.grad_accum 1")


TRAINERS: dict[str, type[TrainConfig]] = {"unet": UNetTrainConfig, "movq": MoVQTrainConfig,
                                          "finetune": FinetuneConfig, "text": TextTrainConfig}


# ------------------------------------------------------------------------------------ JSON


def parse_config(data: dict[str, Any]) -> TrainConfig:
    """The run config of the trainer named by ``data["trainer"]``; unknown or missing keys raise a
    ValueError naming them (``section.key``)."""
    if not isinstance(data, dict) or data.get("trainer") not in TRAINERS:
        found = data.get("trainer") if isinstance(data, dict) else data
        raise ValueError(f"a run config needs 'trainer' in {sorted(TRAINERS)}, got {found!r}")
    return _parse_section(TRAINERS[data["trainer"]], data, "")


def _parse_section(cls: type, data: Any, where: str) -> Any:
    """The dataclass ``cls`` from a JSON object whose keys are exactly its fields (``where``: the key prefix)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a JSON object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    unknown = sorted(set(data) - set(names))
    missing = [n for n in names if n not in data and n not in optional]
    if unknown or missing:
        raise ValueError(f"{cls.__name__}: unknown keys {[where + k for k in unknown]}, missing keys "
                         f"{[where + k for k in missing]}; the keys are {names}")
    return cls(**{name: _parse_value(hints[name], data[name], where + name) for name in names if name in data})


def _parse_value(hint: Any, value: Any, where: str) -> Any:
    """``value`` (from JSON) as the type ``hint``, with an error naming ``where`` when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hasattr(hint, "from_dict"):  # a model architecture: its own strict parser
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a JSON object, got {value!r}")
        try:
            return hint.from_dict(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
    if dataclasses.is_dataclass(hint):
        return _parse_section(hint, value, where + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ValueError(f"{where} must be a list of {len(args) if args[-1] is not Ellipsis else 'any'} "
                             f"entries, got {value!r}")
        types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_parse_value(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(types, value)))
    expected = {dict: (dict,), bool: (bool,), int: (int,), float: (int, float), str: (str,)}[hint]
    if not isinstance(value, expected) or (hint is not bool and isinstance(value, bool)):
        raise ValueError(f"{where} must be of type {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def config_to_dict(config: Any) -> Any:
    """The JSON form of a run config (or of any section): nested dicts, tuples as lists."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [config_to_dict(v) for v in config]
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a run config JSON and apply ``section.key=value`` overrides."""
    return parse_config(apply_overrides(json.loads(Path(path).read_text()), overrides))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with ``section.key=value`` overrides applied (any depth of dots)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {parent!r} is not a section")
        target[leaf] = value
    return data


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` written over it, objects merged key by key (lists are replaced)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_stages(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> list[UNetTrainConfig]:
    """The U-Net run configs of a recipe ``{"trainer": "recipe", "notes", "common", "stages"}``, in order.

    Stage k is ``common`` with ``stages[k]`` merged over it, then the overrides (which thus apply to
    every stage). A later stage that leaves out ``model.init_unet`` starts from the previous stage's
    exported model folder ``<out_dir>/final``; one that leaves out ``text.encoder_path`` (and has no
    ``text.t5_config``) takes its text encoder from there too, with the trained projection and null
    embedding.
    """
    unknown = sorted(set(data) - {"trainer", "notes", "common", "stages"})
    if data.get("trainer") != "recipe" or unknown or not data.get("stages"):
        raise ValueError(f"a recipe needs trainer='recipe', 'common' and a non-empty 'stages' list; "
                         f"unknown keys {unknown}")
    stages: list[UNetTrainConfig] = []
    for index, stage in enumerate(data["stages"]):
        stage = apply_overrides(_merged(data.get("common", {}), stage), overrides)
        if index > 0:
            previous = str(Path(stages[-1].run.out_dir) / "final")
            stage.setdefault("model", {}).setdefault("init_unet", previous)
            if not stage.setdefault("text", {}).get("t5_config"):
                stage["text"].setdefault("encoder_path", previous)
        config = parse_config(stage)
        if not isinstance(config, UNetTrainConfig):
            raise ValueError(f"recipe stage {index} is a {config.trainer!r} run; recipes hold U-Net runs only")
        stages.append(config)
    return stages


def load_run_configs(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                     stage: int | None = None) -> list[TrainConfig]:
    """The configs a config file asks to train in order: one run, or a recipe's stages (only ``stage``
    when given, 0-based)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and data.get("trainer") == "recipe":
        stages = recipe_stages(data, overrides)
        if stage is not None and not 0 <= stage < len(stages):
            raise ValueError(f"--stage {stage}: the recipe has stages 0..{len(stages) - 1}")
        return stages if stage is None else [stages[stage]]
    if stage is not None:
        raise ValueError("--stage is for recipes (trainer='recipe') only")
    return [parse_config(apply_overrides(data, overrides))]
