"""Pipelines (inference only): text-to-image, Kandinsky Flash, inpainting, img2img, and their factories."""

from .factory import (
    DEFAULT_MODEL,
    get_img2img_pipeline,
    get_inpainting_pipeline,
    get_T2I_Flash_pipeline,
    get_T2I_pipeline,
)
from .img2img import Kandinsky3Img2ImgPipeline
from .inpainting import Kandinsky3InpaintingPipeline
from .text_to_image import Kandinsky3Pipeline

__all__ = [
    "DEFAULT_MODEL",
    "Kandinsky3Img2ImgPipeline",
    "Kandinsky3InpaintingPipeline",
    "Kandinsky3Pipeline",
    "get_T2I_Flash_pipeline",
    "get_T2I_pipeline",
    "get_img2img_pipeline",
    "get_inpainting_pipeline",
]
