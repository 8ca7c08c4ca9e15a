"""The three Kandinsky 3 networks: U-Net, MoVQ autoencoder and T5 text conditioning."""

from .movq import MoVQ, MoVQConfig, VectorQuantizer
from .text_encoder import TextEncoder
from .unet import UNet
from .unet_config import UNetConfig

__all__ = ["MoVQ", "MoVQConfig", "TextEncoder", "UNet", "UNetConfig", "VectorQuantizer"]
