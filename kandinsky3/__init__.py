"""Kandinsky 3: text-to-image latent diffusion (U-Net, MoVQ, T5 text conditioning).

    from kandinsky3 import get_T2I_pipeline
    pipe = get_T2I_pipeline("cuda", fp16=True)
    images = pipe("A cute corgi lives in a house made out of sushi.")
"""

from .pipelines import (
    get_img2img_pipeline,
    get_inpainting_pipeline,
    get_T2I_Flash_pipeline,
    get_T2I_pipeline,
)

__all__ = ["get_T2I_Flash_pipeline", "get_T2I_pipeline", "get_img2img_pipeline", "get_inpainting_pipeline"]
__version__ = "0.1.0"
