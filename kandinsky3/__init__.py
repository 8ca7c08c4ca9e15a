"""Kandinsky 3: text-to-image latent diffusion (U-Net, MoVQ, T5 text conditioning).

    from kandinsky3 import load_pipeline
    pipe = load_pipeline("text-to-image")   # ai-forever/Kandinsky3.1 on CUDA if present, placed to fit the machine
    images = pipe("A cute corgi lives in a house made out of sushi.")

``load_pipeline(task, model, *, device, options=LoadOptions(...))`` builds every task ("text-to-image", "flash",
"inpainting", "img2img"); the seed's ``get_T2I_pipeline("cuda", fp16=True)`` and its siblings still work.
"""

from .errors import UsageError
from .pipelines.load import (LoadOptions, get_img2img_pipeline, get_inpainting_pipeline, get_T2I_Flash_pipeline,
                             get_T2I_pipeline, load_pipeline)

__all__ = ["LoadOptions", "UsageError", "load_pipeline",  # and the seed's factories:
           "get_T2I_pipeline", "get_T2I_Flash_pipeline", "get_inpainting_pipeline", "get_img2img_pipeline"]
__version__ = "0.1.0"
