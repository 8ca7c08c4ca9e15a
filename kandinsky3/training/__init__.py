"""Training: the MoVQ autoencoder and the U-Net (base and inpainting) trainers.

Start reading at :mod:`.train_unet` or :mod:`.train_movq`: each is one run, top to bottom (and
:mod:`.finetune`: a LoRA or every U-Net weight of an existing model, on your images). What they
share, as plain imports:

- :mod:`.config` — the run configs: nested frozen dataclasses, parsed once from JSON (``configs/*.json``);
- :mod:`.distributed` — torchrun setup, DDP / FSDP2, launch commands;
- :mod:`.image_datasets` — the shapes set or an image folder, held in memory or read on demand;
- :mod:`.seeding` — the batch order and every random draw as a function of (seed, step);
- :mod:`.optim` — AdamW, Lion, the learning rate, mixed precision, the clipped optimizer step;
- :mod:`.ema` — the moving average of the weights that a run exports;
- :mod:`.checkpoint` — ``checkpoint.pt``, written atomically, and resuming from it;
- :mod:`.run_log` — ``config.json``, ``train.log``, ``log.csv``;
- :mod:`.sample_grids` — the PNG grids written during a run;
- U-Net runs: :mod:`.initial_models` (text encoder, GLIDE init), :mod:`.caption_tokenizer`,
  :mod:`.inpainting_masks`; MoVQ runs: :mod:`.losses` (patch discriminator, hinge, adaptive weight).

Entry point: ``kandinsky3 train CONFIG.json [--resume] [--stage K] [section.key=value ...]`` (:func:`main`).
"""


def main(argv: list[str] | None = None) -> int:
    """The ``kandinsky3 train`` command (see :mod:`kandinsky3.training.__main__`)."""
    from .__main__ import main as _main

    return _main(argv)
