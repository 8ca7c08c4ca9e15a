"""The OpenAI Images API under ``/v1``: what the ``openai`` SDK, Open WebUI and LibreChat call.

- ``POST /v1/images/generations`` (JSON): ``prompt``, ``n``, ``size`` ("WxH" or "auto": the model's), 
  ``response_format`` ("b64_json", the default, or "url"); ``model``, ``quality``, ``style``, ``user`` and the
  other fields of the real API are accepted and ignored. Extension: an integer ``seed`` (image i gets seed + i).
- ``POST /v1/images/edits`` (multipart): ``image`` (or ``image[]``, the first is used), optional ``mask`` PNG
  whose fully transparent pixels are repainted (the inpainting model); without a mask, an image with transparent
  pixels is repainted there, and an opaque one is redrawn by img2img at strength 0.75. ``size`` resizes the input.
- ``GET /v1/models``: the one model served.
- ``GET /v1/images/files/{token}.png``: the images of "url" answers, kept in memory (the last
  ``ServerConfig.stored_images``); the token in the URL is the credential, so no API key is needed.

Steps, guidance and sampler are the model's defaults. Errors: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from PIL import Image
from starlette.datastructures import UploadFile

from ..errors import UsageError
from .app import PUBLIC_PREFIX, Service, wait_for_job
from .engine import ImageRequest, ImageResult
from .errors import ApiError
from .inputs import Fields, open_image, parse_json, parse_size

__all__ = ["router"]

EDIT_STRENGTH = 0.75  # img2img strength of an edit without a mask or transparent pixels
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")
_UPLOAD_SIDE_FACTOR = 4


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _count_and_size(fields: Fields, service: Service) -> tuple[int, tuple[int, int] | None]:
    limit = service.config.limits.max_images
    try:
        n = fields.integer("n", 1, minimum=1, maximum=limit)
        size = parse_size(fields.string("size"))
        response_format = fields.string("response_format", "b64_json")
        output_format = fields.string("output_format", "png")
    except UsageError as error:
        raise _invalid(str(error), str(error).split(" ", 1)[0]) from None
    if response_format not in ("b64_json", "url"):
        raise _invalid(f"response_format must be 'b64_json' or 'url', got {response_format!r}", "response_format")
    if output_format != "png":
        raise _invalid(f"output_format {output_format!r} is not offered; this server writes 'png'", "output_format")
    return n, size


def _answer(result: ImageResult, request: Request, response_format: str, service: Service) -> dict[str, Any]:
    if response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}{PUBLIC_PREFIX}{service.store.put(png)}.png"} for png in result.pngs]
    else:
        data = [{"b64_json": base64.b64encode(png).decode()} for png in result.pngs]
    return {"created": int(time.time()), "data": data, "output_format": "png"}


router = APIRouter(prefix="/v1")


def _service(request: Request) -> Service:
    return request.app.state.service


@router.post("/images/generations")
async def generations(request: Request):
    service = _service(request)
    fields = Fields(parse_json(await request.body()))
    n, size = _count_and_size(fields, service)
    prompt = fields.string("prompt", "")
    if not prompt.strip():
        raise _invalid("prompt must be a non-empty string", "prompt")
    width, height = size or (None, None)
    image_request = ImageRequest("text-to-image", prompt, width=width, height=height, batch_size=n,
                                 seed=fields.integer("seed", None, minimum=0))
    result = await wait_for_job(request, service, image_request)
    return _answer(result, request, fields.string("response_format", "b64_json"), service)


@router.post("/images/edits")
async def edits(request: Request):
    """Inpainting where the mask (or the image itself) is transparent; img2img for an opaque image alone."""
    service = _service(request)
    upload_side = service.config.limits.max_side * _UPLOAD_SIDE_FACTOR
    form = await request.form(max_files=4, max_fields=64)
    fields = Fields({key: value for key, value in form.items() if isinstance(value, str)})
    for name in ("n", "seed"):  # multipart sends numbers as text
        if isinstance(fields.data.get(name), str) and fields.data[name].strip().isdigit():
            fields.data[name] = int(fields.data[name])
    n, size = _count_and_size(fields, service)
    uploads = [value for key in ("image", "image[]") for value in form.getlist(key)]
    if not uploads or not isinstance(uploads[0], UploadFile):
        raise _invalid("image is required: a PNG, JPEG or WebP file", "image")
    image = open_image(await uploads[0].read(), "image", max_side=upload_side)
    mask_file = form.get("mask")
    mask = None
    if isinstance(mask_file, UploadFile):
        mask = _repaint_mask(open_image(await mask_file.read(), "mask", max_side=upload_side), image.size)
    elif "A" in image.getbands() and (np.asarray(image.getchannel("A")) == 0).any():
        mask = _repaint_mask(image, image.size)
    prompt = fields.string("prompt", "")
    if not prompt.strip():
        raise _invalid("prompt must be a non-empty string", "prompt")
    width, height = size or _working_size(image, mask, service)
    image_request = ImageRequest("img2img" if mask is None else "inpainting", prompt, width=width, height=height,
                                 batch_size=n, seed=fields.integer("seed", None, minimum=0), image=image,
                                 mask=mask, strength=EDIT_STRENGTH)
    result = await wait_for_job(request, service, image_request)
    return _answer(result, request, fields.string("response_format", "b64_json"), service)


@router.get("/models")
async def models(request: Request):
    service = _service(request)
    return {"object": "list", "data": [{"id": service.engine.model_name, "object": "model",
                                        "created": service.started, "owned_by": "kandinsky3"}]}


@router.get("/images/files/{name}")
async def stored_image(request: Request, name: str):
    token, dot, extension = name.partition(".")
    store = _service(request).store
    png = store.get(token) if _TOKEN.fullmatch(token) and dot and extension == "png" else None
    if png is None:
        raise ApiError(404, "no such image (images are kept for the last requests only)", code="not_found")
    return Response(png, media_type="image/png")


def _repaint_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """OpenAI's mask convention → ours: fully transparent pixels (alpha 0) are repainted; (H, W) float32, 1 =
    repaint, at the image's size."""
    if "A" not in mask.getbands():
        raise _invalid("mask must be a PNG with an alpha channel: its fully transparent pixels mark the area to "
                       "repaint", "mask")
    if mask.size != size:
        raise _invalid(f"mask is {mask.width}x{mask.height} but image is {size[0]}x{size[1]}; they must have the "
                       "same size", "mask")
    return (np.asarray(mask.getchannel("A")) == 0).astype(np.float32)


def _working_size(image: Image.Image, mask, service: Service) -> tuple[int | None, int | None]:
    """Inpainting keeps the input's size; img2img works on the input floored to the model's size multiple."""
    if mask is not None:
        return None, None
    multiple = service.engine.multiple
    return max(multiple, image.width // multiple * multiple), max(multiple, image.height // multiple * multiple)
