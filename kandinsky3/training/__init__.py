"""Training: the MoVQ autoencoder and the U-Net (base and inpainting) trainers.

Modules, in the order a run uses them: ``config`` (run configs as frozen dataclasses / JSON), ``data``
(datasets, deterministic batch order and randomness), ``tokenizer`` (caption tokenizer for a T5 trained
from scratch), ``distributed`` (torchrun setup, DDP / FSDP2, launch commands), ``optim`` (AdamW, Lion,
warm-up), ``ema``, ``losses`` (patch discriminator, hinge, adaptive weight), ``masks`` (inpainting masks
and input), ``loop`` (checkpoints, logging), ``train_movq``, ``train_unet`` with ``unet_io`` (text encoder,
GLIDE init, samples, export).

Entry point: ``kandinsky3 train CONFIG.json [--resume] [key=value ...]`` (:func:`main`).
"""


def main(argv: list[str] | None = None) -> int:
    """The ``kandinsky3 train`` command (see :mod:`kandinsky3.training.__main__`)."""
    from .__main__ import main as _main

    return _main(argv)
