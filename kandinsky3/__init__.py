"""Kandinsky 3: text-to-image latent diffusion (U-Net, MoVQ, T5 text conditioning)."""
