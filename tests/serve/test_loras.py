"""LoRAs on the server: --lora-dir is listed at /sdapi/v1/loras, refreshed, and applied per request by
``<lora:name:scale>`` prompt tags (txt2img, img2img, inpainting, OpenAI), with no state left between requests.

The files are made here from the served tiny model's own modules with random non-zero adapter weights (peft starts
B at 0, which would hide every mistake). The reference for "no LoRA" is the session's plain tiny engine.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import start_server, stop_server, write_random_lora
from kandinsky3 import lora
from kandinsky3.errors import UsageError
from kandinsky3.serve.app import ServerConfig, Service
from kandinsky3.serve.engine import Engine, ImageRequest
from kandinsky3.serve.jobs import JobQueue
from kandinsky3.serve.prompt_cache import PromptCache

pytest.importorskip("peft")

QUICK = dict(steps=2, sampler="ddim", width=64, height=64, seed=11)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    """The tiny model serving a folder with three usable LoRAs and three files it must skip."""
    folder = tmp_path_factory.mktemp("loras")
    engine = Engine.load("tiny", device="cpu", lora_dir=folder)
    base, inpaint = engine.text_to_image, engine.inpainting
    write_random_lora(folder / "style.safetensors", base.unet, base.text_encoder, ("attention", "resnet"), 0)
    write_random_lora(folder / "words.safetensors", base.unet, base.text_encoder, ("text_projection",), 1)
    write_random_lora(folder / "inpaint_style.safetensors", inpaint.unet, inpaint.text_encoder, ("attention",), 2)
    identity = lora.base_identity(base.unet, "another model")
    other = dataclasses.replace(identity, probes=tuple(p + 0.5 for p in identity.probes))
    write_random_lora(folder / "other_base.safetensors", base.unet, base.text_encoder, ("attention",), 3, base=other)
    (folder / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(folder / "plain.safetensors"))
    (folder / "notes.txt").write_text("not a LoRA")
    engine.loras.refresh()
    return engine


@pytest.fixture(scope="module")
def http(engine):
    service = Service([engine], ServerConfig(queue_size=4, timeout=120, ui=False))
    server, thread, running = start_server(service)
    with httpx.Client(base_url=running.url, timeout=120) as client:
        yield client
    stop_server(server, thread)


def generate(engine: Engine, prompt: str, task: str = "text-to-image", **changes) -> tuple[np.ndarray, str]:
    """One image of ``prompt`` through the engine's prepare and run, and its PNG parameters."""
    queue = JobQueue({"cpu": engine.run}, max_waiting=1)
    queue.start()
    try:
        result = queue.submit(engine.prepare(ImageRequest(task, prompt, **{**QUICK, **changes}))).result(60)
    finally:
        queue.shutdown(grace=1)
    return np.asarray(result.images[0]), result.parameters[0]


def test_the_folder_lists_the_loras_of_the_served_model_and_skips_the_rest(http, engine, caplog):
    items = http.get("/sdapi/v1/loras").json()
    assert [item["name"] for item in items] == ["inpaint_style", "style", "words"]
    style = items[1]
    assert set(style) == {"name", "alias", "path", "metadata"} and style["alias"] == "style"
    assert style["path"].endswith("style.safetensors") and style["metadata"]["rank"] == "4"
    assert json.loads(style["metadata"]["targets"]) == ["attention", "resnet"]
    assert json.loads(style["metadata"]["trigger_words"]) == ["sks"]
    with caplog.at_level(logging.WARNING, logger="kandinsky3.serve.loras"):
        engine.loras.refresh()
    skipped = " ".join(record.getMessage() for record in caplog.records)
    for name in ("other_base", "junk", "plain"):
        assert f"{name}.safetensors" in skipped
    assert "notes.txt" not in skipped and "another model" in skipped


def test_refresh_picks_up_new_and_removed_files(http, engine):
    folder = engine.loras.directory
    shutil.copy(folder / "style.safetensors", folder / "style v2.safetensors")
    try:
        assert http.post("/sdapi/v1/refresh-loras").status_code == 200
        assert "style v2" in [item["name"] for item in http.get("/sdapi/v1/loras").json()]
        image, _ = generate(engine, "a red circle <lora:style v2:1>")
        assert np.array_equal(image, generate(engine, "a red circle <lora:style:1>")[0])
        shutil.copy(folder / "words.safetensors", folder / "style v2.safetensors")  # a changed file is reloaded
        http.post("/sdapi/v1/refresh-loras")
        image, _ = generate(engine, "a red circle <lora:style v2:1>")
        assert np.array_equal(image, generate(engine, "a red circle <lora:words:1>")[0])
    finally:
        (folder / "style v2.safetensors").unlink()
        http.post("/sdapi/v1/refresh-loras")
    assert "style v2" not in [item["name"] for item in http.get("/sdapi/v1/loras").json()]
    with pytest.raises(UsageError, match="unknown LoRA 'style v2'"):
        engine.prepare(ImageRequest("text-to-image", "a red circle <lora:style v2:1>"))


def test_a_tag_changes_the_image_and_leaves_nothing_behind(engine, tiny_engine):
    plain, _ = generate(tiny_engine, "a red circle")  # a server without --lora-dir
    styled, parameters = generate(engine, "a red circle <lora:style:1>")
    assert not np.array_equal(styled, plain)
    assert parameters.startswith("a red circle <lora:style:1>\n")  # A1111 writes the prompt as sent
    assert np.array_equal(generate(engine, "a red circle <lora:style:0>")[0], plain)
    assert np.array_equal(generate(engine, "a red circle")[0], plain)  # the adapter is loaded, at scale 0
    half, _ = generate(engine, "a red circle <lora:style:0.5>", negative_prompt="blurry <lora:words:1>")
    assert not np.array_equal(half, styled) and not np.array_equal(half, plain)
    assert np.array_equal(generate(engine, "a red circle", negative_prompt="blurry")[0],
                              generate(tiny_engine, "a red circle", negative_prompt="blurry")[0])


def test_img2img_and_inpainting_take_the_loras_made_for_their_u_net(engine, tiny_engine):
    image = Image.new("RGB", (64, 64), (90, 90, 200))
    img2img = dict(task="img2img", image=image, strength=0.6)
    assert not np.array_equal(generate(engine, "x <lora:style:1>", **img2img)[0],
                              generate(tiny_engine, "x", **img2img)[0])
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpaint = dict(task="inpainting", image=image, mask=mask, width=None, height=None)
    plain, _ = generate(tiny_engine, "x", **inpaint)
    assert not np.array_equal(generate(engine, "x <lora:inpaint_style:1>", **inpaint)[0], plain)
    assert np.array_equal(generate(engine, "x", **inpaint)[0], plain)
    with pytest.raises(UsageError, match="'style' was made for another U-Net than the inpainting model's"):
        engine.prepare(ImageRequest("inpainting", "x <lora:style:1>", image=image, mask=mask))
    with pytest.raises(UsageError, match="'inpaint_style' was made for another U-Net than the text-to-image"):
        engine.prepare(ImageRequest("text-to-image", "x <lora:inpaint_style:1>"))


@pytest.mark.parametrize("prompt, reason", [
    ("a red circle <lora:nope:1>", "unknown LoRA 'nope' in the prompt; available: inpaint_style, style, words"),
    ("a red circle <lora:style:nan>", "the scale must be a finite number"),
    ("a red circle <lora:style:strong>", "the scale must be a number"),
    ("a red circle <lora:style:1> <lora:style:0.5>", "named twice"),
    ("<lora:style:1>", "more than <lora:…> tags"),
])
def test_bad_tags_are_400s_before_the_queue(http, prompt, reason):
    answer = http.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 2})
    assert answer.status_code == 400 and reason in answer.json()["detail"], answer.text
    answer = http.post("/v1/images/generations", json={"prompt": prompt})
    assert answer.status_code == 400 and reason in answer.json()["error"]["message"], answer.text


def test_a_server_without_lora_dir_says_so(tiny_engine):
    with pytest.raises(UsageError, match="offers no LoRAs .*--lora-dir"):
        tiny_engine.prepare(ImageRequest("text-to-image", "a red circle <lora:style:1>"))
    assert tiny_engine.loras.entries() == []


def _openai_image(http, prompt: str) -> bytes:
    answer = http.post("/v1/images/generations", json={"prompt": prompt, "size": "64x64", "seed": 3})
    assert answer.status_code == 200, answer.text
    return Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))).tobytes()


def test_a1111_and_openai_requests_honour_the_tags(http):
    body = {"prompt": "a red circle <lora:style:1>", "steps": 2, "sampler_name": "DDIM", "seed": 3, "width": 64,
            "height": 64}
    answer = http.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(answer["info"])
    assert info["prompt"] == body["prompt"] and info["infotexts"][0].startswith(body["prompt"])
    plain = http.post("/sdapi/v1/txt2img", json={**body, "prompt": "a red circle"}).json()
    assert answer["images"][0] != plain["images"][0]
    assert _openai_image(http, "a red circle <lora:style:1>") != _openai_image(http, "a red circle")


def test_at_most_capacity_adapters_stay_loaded_the_least_recently_used_go(engine):
    loaded = engine.loaded_loras["text-to-image"]
    loaded.capacity = 1
    try:
        loaded.apply((("style", 1.0),))
        loaded.apply((("words", 0.5),))
        assert loaded.names == ["words"]
        assert lora.lora_scales(engine.text_to_image.unet, engine.text_to_image.text_encoder) == {"words": 0.5}
        loaded.apply((("style", 1.0), ("words", 1.0)))  # a request may name more than the capacity
        assert loaded.names == ["style", "words"]
    finally:
        loaded.capacity = 4
        loaded.apply(())


def test_encoded_prompts_are_cached_per_text_encoder_lora_scale(engine, tiny_engine):
    plain, _ = generate(tiny_engine, "a blue square")
    words, _ = generate(engine, "a blue square <lora:words:1>")  # the projection's adapter alone: only T5's
    assert not np.array_equal(words, plain)  # encoding differs, so a cache hit on the plain one would show
    assert not np.array_equal(generate(engine, "a blue square <lora:words:0.5>")[0], words)
    assert np.array_equal(generate(engine, "a blue square <lora:words:1>")[0], words)
    assert np.array_equal(generate(engine, "a blue square")[0], plain)  # loaded, not named: no LoRA
    encoder = engine.text_to_image.text_encoder
    cache = encoder.encode_tokens
    assert isinstance(cache, PromptCache)
    tokens = encoder.tokenize(["a green star"])
    with torch.inference_mode():
        for scale in (1.0, 0.25, 0.0, 1.0):
            engine.loaded_loras["text-to-image"].apply((("words", scale),))
            assert torch.equal(cache(*tokens)[0], cache.encode_tokens(*tokens)[0]), scale
    engine.loaded_loras["text-to-image"].apply(())


@pytest.mark.parametrize("with_folder", [True, False])
def test_the_web_ui_offers_the_folders_loras_and_scans_it_again_on_request(engine, tiny_engine, monkeypatch,
                                                                           with_folder):
    """The page gets a LoRA picker when the server has --lora-dir, listing what GET /sdapi/v1/loras lists; its ↻
    picks up files added since."""
    pytest.importorskip("gradio")
    from kandinsky3.serve import app as app_module, ui
    from kandinsky3.serve.ui_backend import QueueBackend

    shown = {}
    monkeypatch.setattr(ui, "mount_ui", lambda app, backend, settings: shown.update(backend=backend,
                                                                                   settings=settings))
    service = Service([engine if with_folder else tiny_engine], ServerConfig(queue_size=4, timeout=120))
    app_module.create_app(service)
    assert shown["settings"].loras is with_folder and isinstance(shown["backend"], QueueBackend)
    backend = shown["backend"]
    if not with_folder:
        assert backend.loras() == backend.loras(refresh=True) == []
        return
    assert backend.loras() == ["inpaint_style", "style", "words"]
    folder = engine.loras.directory
    shutil.copy(folder / "style.safetensors", folder / "extra.safetensors")
    try:
        assert "extra" not in backend.loras() and "extra" in backend.loras(refresh=True)
    finally:
        (folder / "extra.safetensors").unlink()
        engine.loras.refresh()
