"""The AUTOMATIC1111-compatible API under ``/sdapi/v1``: the subset that Open WebUI, SillyTavern, LibreChat and the
``webuiapi`` client call, with A1111's field names and answer shapes.

Conventions translated here:
- ``cfg_scale`` is A1111's s in ε_u + s·(ε_c − ε_u); the library's w is s − 1 (so cfg_scale 4 is Kandinsky's
  default w = 3, and cfg_scale 1 turns guidance off).
- ``seed`` −1 (or absent) draws a random seed; image i of a request has seed + i (``all_seeds`` in ``info``).
- Absent ``steps``, ``cfg_scale``, ``width``, ``height``, ``sampler_name``: the model's own defaults.
- ``eta`` applies to the samplers that take it (ddim, "Kandinsky 3.1") and is ignored by the others, as in A1111.
- ``mask`` (white = repaint; ``inpainting_mask_invert`` 1: black = repaint) sends img2img to the inpainting model;
  ``mask_blur``, ``inpainting_fill`` and ``resize_mode`` are ignored (the input is resized to width × height).
- Unknown fields (``enable_hr``, ``restore_faces``, ``alwayson_scripts``, ``override_settings``, ...) are
  accepted and ignored.
- LoRAs: ``GET /loras`` lists the files of ``--lora-dir`` that fit the served model (``name``, ``alias``, ``path``,
  ``metadata``), ``POST /refresh-loras`` scans the folder again, and a prompt applies them with
  ``<lora:name:scale>`` tags (:mod:`kandinsky3.serve.loras`); an unknown name is a 400 that lists the known ones.

Samplers (A1111 name → ours; our own names are accepted too):

    ==============  =============  ==============================================
    A1111 name      ours           algorithm
    ==============  =============  ==============================================
    DPM++ 2M        dpmpp_2m       DPM-Solver++(2M), deterministic
    DPM++ 2M SDE    dpmpp_2m_sde   SDE-DPM-Solver++(2M)
    DDIM            ddim           DDIM (eta 0: deterministic)
    DDPM            ddpm           strided ancestral DDPM
    Kandinsky 3.1   original       Kandinsky 3.1's own (the model's default)
    Kandinsky 3.0   original30     Kandinsky 3.0's own
    ==============  =============  ==============================================

Any other name ("Euler a", "DPM++ 2M Karras", ...) is a 400 that lists these. ``scheduler`` must be "automatic"
(or absent): each sampler brings its own timestep spacing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

from fastapi import APIRouter, Request

from ..diffusion import registry
from ..errors import UsageError
from ..png_info import parse_parameters, read_parameters
from .app import Service, wait_for_job
from .engine import ImageRequest, ImageResult
from .inputs import Fields, decode_image, parse_json

__all__ = ["SAMPLERS", "router", "sampler_from_a1111"]

SAMPLERS = {  # ours → (A1111 name, extra aliases)
    "dpmpp_2m": ("DPM++ 2M", ("k_dpmpp_2m",)),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", ("k_dpmpp_2m_sde",)),
    "ddim": ("DDIM", ()),
    "ddpm": ("DDPM", ()),
    "original": ("Kandinsky 3.1", ("kandinsky",)),
    "original30": ("Kandinsky 3.0", ()),
}
_LOOKUP = {alias.lower(): ours for ours, (name, aliases) in SAMPLERS.items() for alias in (ours, name, *aliases)}
_SCHEDULERS = ("", "automatic")
_UPLOAD_SIDE_FACTOR = 4  # input images may be this many times the output side limit before they are refused


def sampler_from_a1111(name: str | None) -> str | None:
    """Our sampler for an A1111 sampler name (or alias, or our own name); None stays None (the model's)."""
    if name is None or name == "":
        return None
    ours = _LOOKUP.get(name.strip().lower())
    if ours is None:
        offered = ", ".join(f"{a1111!r} ({ours})" for ours, (a1111, _) in SAMPLERS.items())
        raise UsageError(f"sampler {name!r} is not available here; choose one of {offered}")
    return ours


def _model_ids(service: Service) -> dict[str, str]:
    name = service.engine.model_name
    short_hash = hashlib.sha256(name.encode()).hexdigest()[:10]  # an identifier of the served model, no file hash
    return {"title": f"{name} [{short_hash}]", "model_name": name, "hash": short_hash}


def _common_request(fields: Fields, service: Service, task: str, **images: Any) -> ImageRequest:
    """The fields txt2img and img2img share → an :class:`ImageRequest` (checked further by the engine)."""
    scheduler = fields.string("scheduler", "")
    if scheduler.lower() not in _SCHEDULERS:
        raise UsageError(f"scheduler {scheduler!r} is not available; use 'automatic' (each sampler brings its own "
                         "timestep spacing)")
    sampler = sampler_from_a1111(fields.string("sampler_name") or fields.string("sampler_index"))
    cfg_scale = fields.number("cfg_scale", None, minimum=1.0)
    seed = fields.integer("seed", -1, minimum=-1)
    eta = fields.number("eta", None, minimum=0.0)
    takes_eta = registry.get_sampler(sampler or service.engine.default_sampler(task)).eta is not None
    return ImageRequest(
        task, fields.string("prompt", ""), fields.string("negative_prompt") or None,
        width=fields.integer("width", None, minimum=1), height=fields.integer("height", None, minimum=1),
        steps=fields.integer("steps", None, minimum=1),
        guidance_scale=None if cfg_scale is None else cfg_scale - 1.0,
        sampler=sampler, eta=eta if takes_eta else None, seed=None if seed == -1 else seed,
        batch_size=fields.integer("batch_size", 1, minimum=1), n_iter=fields.integer("n_iter", 1, minimum=1),
        **images,
    )


def _answer(result: ImageResult, body: dict[str, Any], service: Service) -> dict[str, Any]:
    """A1111's answer: raw base64 PNGs, the request's parameters with what was resolved, and ``info`` as a JSON
    string (seeds, sampler, size, the infotexts)."""
    request, checked = result.prepared.request, result.prepared.checked
    width, height = result.prepared.output_size
    resolved = {"prompt": request.prompt, "negative_prompt": request.negative_prompt or "", "seed": checked.seed,
                "steps": checked.steps, "cfg_scale": checked.guidance_scale + 1.0, "width": width, "height": height,
                "sampler_name": SAMPLERS.get(checked.sampler, (checked.sampler,))[0],
                "batch_size": request.batch_size, "n_iter": request.n_iter}
    count = len(result.seeds)
    info = {
        **resolved, "all_prompts": [request.prompt] * count, "all_negative_prompts": [resolved["negative_prompt"]]
        * count, "seed": result.seeds[0] if count else checked.seed, "all_seeds": result.seeds, "subseed": -1,
        "all_subseeds": [-1] * count, "subseed_strength": 0, "sd_model_name": service.engine.model_name,
        "sd_model_hash": _model_ids(service)["hash"], "infotexts": result.parameters,
        "denoising_strength": checked.strength, "interrupted": result.interrupted, "task": request.task,
    }
    parameters = {**body, **resolved, "init_images": None, "mask": None}
    return {"images": [base64.b64encode(png).decode() for png in result.pngs], "parameters": parameters,
            "info": json.dumps(info)}


router = APIRouter(prefix="/sdapi/v1")


def _service(request: Request) -> Service:
    return request.app.state.service


def _upload_side(service: Service) -> int:
    return service.config.limits.max_side * _UPLOAD_SIDE_FACTOR


@router.post("/txt2img")
async def txt2img(request: Request):
    service = _service(request)
    body = parse_json(await request.body())
    result = await wait_for_job(request, service, _common_request(Fields(body), service, "text-to-image"))
    return _answer(result, body, service)


@router.post("/img2img")
async def img2img(request: Request):
    """img2img, or inpainting when a mask comes along (white = repaint, unless ``inpainting_mask_invert``)."""
    service = _service(request)
    body = parse_json(await request.body())
    fields = Fields(body)
    init = fields.strings("init_images")
    if not init:
        raise UsageError("init_images must hold one image (base64 or a data URL)")
    image = decode_image(init[0], "init_images[0]", max_side=_upload_side(service))
    mask = fields.string("mask")
    if mask is not None:
        mask = decode_image(mask, "mask", max_side=_upload_side(service)).convert("L")
        if fields.boolean("inpainting_mask_invert"):
            mask = mask.point(lambda value: 255 - value)
    task = "img2img" if mask is None else "inpainting"
    strength = fields.number("denoising_strength", 0.75, minimum=0.0, maximum=1.0)
    image_request = _common_request(fields, service, task, image=image, mask=mask, strength=strength)
    return _answer(await wait_for_job(request, service, image_request), body, service)


@router.get("/progress")
async def progress(request: Request):
    """The oldest running job's progress; ``job_count`` counts the running and the waiting jobs."""
    state = _service(request).queue.state()
    job = state.running[0] if state.running else None
    done = job.progress if job else None
    return {
        "progress": done.fraction if done else 0.0,
        "eta_relative": (done.eta_s or 0.0) if done else 0.0,
        "state": {"skipped": False, "interrupted": bool(job and job.interrupted), "stopping_generation": False,
                  "job": job.id if job else "", "job_count": state.job_count, "job_timestamp": "0",
                  "job_no": 0, "sampling_step": done.step if done else 0,
                  "sampling_steps": done.steps if done else 0},
        "current_image": None, "textinfo": None,
    }


@router.post("/interrupt")
async def interrupt(request: Request):
    for job in _service(request).queue.state().running:
        job.interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request):
    for job in _service(request).queue.state().running:
        job.skip()
    return {}


@router.get("/options")
async def get_options(request: Request):
    service = _service(request)
    ids = _model_ids(service)
    return {**service.options, "sd_model_checkpoint": ids["title"], "sd_checkpoint_hash": ids["hash"],
            "samples_format": "png"}


@router.post("/options")
async def set_options(request: Request):
    """Accept the served model as ``sd_model_checkpoint`` and keep scalar settings for GET (nothing else
    changes how images are made)."""
    service = _service(request)
    body = parse_json(await request.body())
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is not None and checkpoint not in _model_ids(service).values():
        raise UsageError(f"sd_model_checkpoint {checkpoint!r}: this server serves only "
                         f"{_model_ids(service)['title']!r}")
    for key, value in body.items():
        if isinstance(value, (str, int, float, bool)) and len(service.options) < 128:
            service.options[key] = value
    return None


@router.get("/sd-models")
async def sd_models(request: Request):
    ids = _model_ids(_service(request))
    return [{**ids, "sha256": None, "filename": ids["model_name"], "config": None}]


@router.get("/samplers")
async def samplers(request: Request):
    return [{"name": SAMPLERS[ours][0], "aliases": [ours, *SAMPLERS[ours][1]], "options": {}}
            for ours in _service(request).engine.samplers() if ours in SAMPLERS]


@router.get("/schedulers")
async def schedulers():
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
             "need_inner_model": False}]


@router.get("/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.post("/png-info")
async def png_info(request: Request):
    """The ``parameters`` text of a PNG (base64 or a data URL), as written into the server's images."""
    fields = Fields(parse_json(await request.body()))
    image = decode_image(fields.string("image", ""), "image", max_side=_upload_side(_service(request)))
    text = read_parameters(image)
    return {"info": text or "", "items": {"parameters": text} if text else {},
            "parameters": parse_parameters(text) if text else {}}


async def _empty_list():
    return []


async def _nothing():
    return None


@router.get("/loras")
async def loras(request: Request):
    return [entry.as_a1111() for entry in _service(request).engine.loras.entries()]


@router.post("/refresh-loras")
async def refresh_loras(request: Request):
    """Scan the LoRA folder again (every engine's view of it)."""
    for engine in _service(request).engines:
        await asyncio.to_thread(engine.loras.refresh)
    return None


@router.get("/embeddings")
async def embeddings():
    return {"loaded": {}, "skipped": {}}


@router.get("/cmd-flags")
async def cmd_flags():
    return {}


for _path in ("/upscalers", "/sd-vae", "/prompt-styles", "/latent-upscale-modes", "/hypernetworks"):
    router.add_api_route(_path, _empty_list, methods=["GET"])  # lists clients read; this server has none
for _path in ("/refresh-checkpoints", "/refresh-vae"):
    router.add_api_route(_path, _nothing, methods=["POST"])  # one model, loaded once: nothing to refresh
