"""Pipelines (inference only): text-to-image, Kandinsky Flash, inpainting, img2img, and how to load them."""

from .checks import GenerationRequest, ModelFacts, check_generation, model_facts
from .images import DecodeTiling
from .img2img import Kandinsky3Img2ImgPipeline
from .inpainting import Kandinsky3InpaintingPipeline
from .load import (
    DEFAULT_MODEL,
    TASKS,
    LoadOptions,
    get_img2img_pipeline,
    get_inpainting_pipeline,
    get_T2I_Flash_pipeline,
    get_T2I_pipeline,
    load_pipeline,
)
from .text_to_image import Kandinsky3Pipeline

__all__ = [
    "DEFAULT_MODEL",
    "DecodeTiling",
    "GenerationRequest",
    "ModelFacts",
    "TASKS",
    "Kandinsky3Img2ImgPipeline",
    "Kandinsky3InpaintingPipeline",
    "Kandinsky3Pipeline",
    "LoadOptions",
    "check_generation",
    "get_T2I_Flash_pipeline",
    "get_T2I_pipeline",
    "get_img2img_pipeline",
    "get_inpainting_pipeline",
    "load_pipeline",
    "model_facts",
]
