"""Run configurations of the trainers: one frozen dataclass per run kind, stored as JSON.

- :class:`MoVQRunConfig` (``"run": "movq"``): the autoencoder run of :mod:`.train_movq`.
- :class:`UNetRunConfig` (``"run": "unet"``): the diffusion run of :mod:`.train_unet`, base or
  inpainting (``mode``).
- A *recipe* (``"run": "recipe"``) is a list of U-Net run configs trained one after the other,
  each stage initialised from the previous stage's exported U-Net (``configs/kandinsky3_full_recipe.json``).

JSON files are flat: every key is a field name. Loading rejects unknown keys and names them;
missing keys take the defaults below. Model architectures are embedded as the ``to_dict`` form of
:class:`~kandinsky3.models.unet_config.UNetConfig` / :class:`~kandinsky3.models.movq.MoVQConfig`.
Overrides from the command line are ``key=value`` pairs; the value is parsed as JSON when it
parses (numbers, booleans, lists) and is a string otherwise; ``unet.model_channels=64`` sets a key
inside a dict field.

Batch sizes are *global*: ``batch_size`` samples per optimizer step, summed over all processes and
accumulation micro-steps, so a run gives the same result on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.movq import MoVQConfig
from ..models.unet_config import UNetConfig

__all__ = [
    "TrainConfig",
    "MoVQRunConfig",
    "UNetRunConfig",
    "load_config",
    "config_from_dict",
    "save_config",
    "apply_overrides",
    "recipe_stages",
]

OPTIMIZERS = ("adamw", "lion")
PRECISIONS = ("fp32", "bf16", "fp16")
DATASETS = ("shapes", "folder")
MODES = ("base", "inpainting")


@dataclass(frozen=True)
class TrainConfig:
    """Fields shared by every run kind (data, optimisation, precision, logging, output)."""

    out_dir: str = "runs/run"
    seed: int = 0  # seeds the model init and every random draw of the run (see data.step_generator)
    # data: the synthetic shapes set (num_samples, data_seed, image_size) or a folder (data_root)
    dataset: str = "shapes"
    data_root: str = ""  # folder with images + captions.jsonl / captions.csv (data.FolderDataset)
    num_samples: int = 10000
    data_seed: int = 0
    image_size: int = 64
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0 to lr, then constant (optim.learning_rate)
    max_steps: int = 1000
    batch_size: int = 32  # global batch per optimizer step
    grad_accum: int = 1  # micro-steps per optimizer step (per process)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "fp32"  # autocast dtype; fp16 needs CUDA (a GradScaler is used)
    ema_decay: float = 0.999  # 0 disables the EMA copy (ema.ema_decay_at gives the warm-up)
    # logging and output (intervals in optimizer steps; 0 disables)
    log_interval: int = 10
    sample_interval: int = 500
    checkpoint_interval: int = 500
    device: str = "auto"  # "auto" = cuda:LOCAL_RANK if available, else cpu
    num_threads: int = 0  # torch.set_num_threads at the entry point; 0 = leave the default
    fsdp: bool = False  # shard with FSDP2 instead of DDP (CUDA, for the 3B U-Net)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_choice(self, "precision", PRECISIONS)
        _check_choice(self, "dataset", DATASETS)
        if self.dataset == "folder" and not self.data_root:
            raise ValueError("dataset='folder' needs data_root (a folder with images and captions.jsonl/.csv)")
        for name in ("num_samples", "image_size", "max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(f"need lr > 0, warmup_steps >= 0, grad_clip >= 0; got {self.lr}, "
                             f"{self.warmup_steps}, {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class MoVQRunConfig(TrainConfig):
    """MoVQ autoencoder run: loss = l1·L1 + mse·MSE + codebook·VQ (+ hinge GAN after disc_start)."""

    run: str = "movq"
    movq: dict = field(default_factory=lambda: MoVQConfig(
        ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(16,), resolution=64, norm_groups=8,
        codebook_size=1024, codebook_ema=True, codebook_restart_after=100).to_dict())
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    codebook_weight: float = 1.0
    disc_start: int = -1  # optimizer step at which the patch discriminator switches on; -1 = never
    disc_weight: float = 0.1  # generator GAN weight (times the adaptive factor when disc_adaptive)
    disc_adaptive: bool = True  # Esser et al. 2021: balance GAN and reconstruction grads at the last layer
    disc_lr: float = 0.0  # 0 = same as lr
    disc_channels: int = 64
    disc_layers: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run != "movq":
            raise ValueError(f"MoVQRunConfig needs run='movq', got {self.run!r}")
        MoVQConfig.from_dict(self.movq)  # validates the architecture now, naming bad keys
        if MoVQConfig.from_dict(self.movq).resolution != self.image_size:
            raise ValueError(f"movq.resolution {self.movq['resolution']} != image_size {self.image_size}")

    @property
    def movq_config(self) -> MoVQConfig:
        return MoVQConfig.from_dict(self.movq)


@dataclass(frozen=True)
class UNetRunConfig(TrainConfig):
    """Diffusion run: ε-MSE on the 1000-step cosine schedule (SPEC §5.1-5.2), CFG dropout (SPEC §4.5).

    Text encoder: ``text_encoder_path`` (a pretrained folder: T5 weights + tokenizer + optional
    ``conditioning.safetensors``) or a fresh T5 from ``t5_config`` (a ``T5Config`` dict) with the
    tokenizer in ``tokenizer_dir`` (trained on the dataset captions when the folder has none).
    """

    run: str = "unet"
    mode: str = "base"  # "base" | "inpainting" (9 input channels, GLIDE init from init_unet)
    unet: dict = field(default_factory=lambda: UNetConfig().to_dict())
    movq_path: str = ""  # a MoVQ run's out_dir (movq.safetensors + movq_config.json)
    init_unet: str = ""  # U-Net folder (config.json + model.safetensors) to start from; 4-channel -> GLIDE init
    text_encoder_path: str = ""
    t5_config: dict = field(default_factory=dict)
    tokenizer_dir: str = ""  # "" = <out_dir>/tokenizer
    tokenizer_vocab_size: int = 512
    max_length: int = 128  # token slots per prompt incl. EOS (SPEC §4.2)
    train_text_encoder: bool = False  # False = T5 frozen, as in the report; projection + null emb. always train
    cfg_dropout: float = 0.1  # probability that a sample's context becomes the null context
    mask_coverage: tuple[float, float] = (0.05, 0.6)  # inpainting: repaint-area fraction range
    cache_latents: bool = True  # encode each dataset image once (frozen MoVQ); shapes data only
    # (height, width) pixel sizes for mixed-resolution training (folder data): each step draws one
    # bucket from its step generator and crops every image of the global batch to it; () = square image_size
    resolution_buckets: tuple[tuple[int, int], ...] = ()
    latent_cache: str = ""  # cache file; "" = <out_dir>/latent_cache.pt (reused when its key matches)
    sample_prompts: tuple[str, ...] = ("a red circle", "a blue square on a yellow background")
    sample_steps: int = 50
    sample_guidance: float = 3.0
    sample_sampler: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mask_coverage", tuple(float(c) for c in self.mask_coverage))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        object.__setattr__(self, "resolution_buckets", tuple(tuple(int(v) for v in b) for b in self.resolution_buckets))
        if self.resolution_buckets and self.dataset != "folder":
            raise ValueError("resolution_buckets need dataset='folder' (the shapes set renders one size)")
        if any(len(b) != 2 or min(b) < 1 for b in self.resolution_buckets):
            raise ValueError(f"resolution_buckets must be (height, width) pairs, got {self.resolution_buckets}")
        if self.run != "unet":
            raise ValueError(f"UNetRunConfig needs run='unet', got {self.run!r}")
        _check_choice(self, "mode", MODES)
        unet = UNetConfig.from_dict(self.unet)
        channels = 9 if self.mode == "inpainting" else 4
        if unet.num_channels != channels:
            raise ValueError(f"mode {self.mode!r} needs unet.num_channels={channels}, got {unet.num_channels}")
        if not self.movq_path:
            raise ValueError("movq_path must name a MoVQ run output (movq.safetensors + movq_config.json)")
        if self.mode == "inpainting" and not self.init_unet:
            raise ValueError("mode='inpainting' needs init_unet: the base U-Net folder to initialise from")
        if bool(self.text_encoder_path) == bool(self.t5_config):
            raise ValueError("give exactly one of text_encoder_path (pretrained) and t5_config (fresh T5)")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        low, high = self.mask_coverage
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"mask_coverage must satisfy 0 < low <= high < 1, got {self.mask_coverage}")

    @property
    def unet_config(self) -> UNetConfig:
        return UNetConfig.from_dict(self.unet)


RUN_KINDS: dict[str, type[TrainConfig]] = {"movq": MoVQRunConfig, "unet": UNetRunConfig}


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build the run config named by ``data["run"]``; unknown keys raise a ValueError naming them."""
    kind = data.get("run")
    if kind not in RUN_KINDS:
        raise ValueError(f"config 'run' must be one of {sorted(RUN_KINDS)}, got {kind!r}")
    cls = RUN_KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid keys are {sorted(names)}")
    return cls(**data)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a run config JSON and apply ``key=value`` overrides."""
    data = json.loads(Path(path).read_text())
    return config_from_dict(apply_overrides(data, overrides))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with ``key=value`` (or ``dict_field.key=value``) overrides applied."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {parent!r} is not a dict field")
        target[leaf] = value
    return data


def recipe_stages(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> list[UNetRunConfig]:
    """The stage configs of a recipe ``{"run": "recipe", "notes": ..., "stages": [config, ...]}``.

    Each stage is a full U-Net run config; overrides apply to every stage. A later stage without
    ``init_unet`` / ``text_encoder_path`` starts from the previous stage's export
    (``<out_dir>/final/unet`` and ``<out_dir>/final/text_encoder``, which carries the trained
    projection and null embedding).
    """
    unknown = sorted(set(data) - {"run", "notes", "stages"})
    if data.get("run") != "recipe" or unknown or not data.get("stages"):
        raise ValueError(f"a recipe needs run='recipe' and a non-empty 'stages' list; unknown keys {unknown}")
    stages: list[UNetRunConfig] = []
    for index, stage in enumerate(data["stages"]):
        stage = apply_overrides(stage, overrides)
        if index > 0:
            previous = Path(stages[-1].out_dir) / "final"
            stage.setdefault("init_unet", str(previous / "unet"))
            if not stage.get("t5_config"):
                stage.setdefault("text_encoder_path", str(previous / "text_encoder"))
        config = config_from_dict(stage)
        if not isinstance(config, UNetRunConfig):
            raise ValueError(f"recipe stage {index} is a {config.run!r} run; recipes hold U-Net runs only")
        stages.append(config)
    return stages


def _check_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {getattr(config, name)!r}")


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value
