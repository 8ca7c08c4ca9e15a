"""The real clients, unchanged, against a real server on loopback: the `openai` SDK and `webuiapi`."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")


def png_image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_sdk_generates_two_images_with_the_a1111_parameters_in_their_pngs(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    response = client.images.generate(model="kandinsky3-tiny", prompt="a red circle", n=2, size="64x64",
                                      extra_body={"seed": 7})
    images = [png_image(item.b64_json) for item in response.data]
    assert len(images) == 2 and all(image.size == (64, 64) for image in images)
    assert [image.text["parameters"].splitlines()[0] for image in images] == ["a red circle"] * 2
    assert "Seed: 7" in images[0].text["parameters"] and "Seed: 8" in images[1].text["parameters"]
    assert np.asarray(images[0]).std() > 0 and not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_openai_sdk_url_answers_are_served_by_the_same_server(server):
    import httpx

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    response = client.images.generate(prompt="a blue square", n=1, response_format="url")
    url = response.data[0].url
    assert url.startswith(server.url + "/v1/images/files/")
    fetched = httpx.get(url)  # no key: the token in the URL is the credential
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (128, 128)  # the model's own size
    assert httpx.get(server.url + "/v1/images/files/" + "A" * 32 + ".png").status_code == 404


def test_openai_sdk_edit_repaints_only_the_transparent_pixels_of_the_rgba_mask(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    source = Image.new("RGB", (64, 64), (30, 160, 40))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent = repaint
    files = {}
    for name, picture in (("image", source), ("mask", mask)):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        files[name] = (f"{name}.png", buffer.getvalue(), "image/png")
    response = client.images.edit(image=files["image"], mask=files["mask"], prompt="a yellow star", n=1)
    edited = np.asarray(png_image(response.data[0].b64_json).convert("RGB")).astype(int)
    kept = np.ones((64, 64), bool)
    kept[16:48, 16:48] = False
    assert edited.shape == (64, 64, 3)
    assert np.abs(edited[kept] - [30, 160, 40]).max() <= 1  # kept pixels pasted back
    assert np.abs(edited[~kept] - [30, 160, 40]).max() > 20  # the hole was repainted


def test_openai_sdk_lists_the_model(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    assert [model.id for model in client.models.list()] == ["kandinsky3-tiny"]


def test_openai_sdk_without_the_key_gets_an_authentication_error(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="a red circle")


@pytest.fixture(scope="module")
def webui(server):
    api = webuiapi.WebUIApi(host=server.host, port=server.port, sampler="DPM++ 2M", steps=10,
                            username="anyone", password=server.api_key)
    return api


def test_webuiapi_txt2img_returns_images_seeds_and_the_parameters_text(webui):
    result = webui.txt2img(prompt="a green triangle", negative_prompt="blurry", seed=123, width=64, height=64,
                           cfg_scale=4, batch_size=2, enable_hr=True, restore_faces=True)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [123, 124] and result.info["sampler_name"] == "DPM++ 2M"
    assert result.info["steps"] == 10 and result.info["cfg_scale"] == 4.0
    text = result.images[0].info["parameters"]
    assert text.startswith("a green triangle\nNegative prompt: blurry\n") and "Sampler: dpmpp_2m" in text
    again = webui.txt2img(prompt="a green triangle", negative_prompt="blurry", seed=123, width=64, height=64,
                          cfg_scale=4, batch_size=1)
    difference = np.abs(np.asarray(again.image, int) - np.asarray(result.images[0], int))
    assert difference.max() <= 2  # same seed, same image (alone rather than in a batch of two: rounding only)


def test_webuiapi_img2img_with_a_mask_inpaints_and_without_one_redraws(webui):
    source = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # white = repaint the left half
    result = webui.img2img(images=[source], mask_image=mask, prompt="a blue circle", seed=5, width=64, height=64,
                           sampler_name="DDIM", steps=10, denoising_strength=1.0)
    painted = np.asarray(result.image.convert("RGB")).astype(int)
    assert result.info["task"] == "inpainting"
    assert np.abs(painted[:, 40:] - [200, 40, 40]).max() <= 1 and np.abs(painted[:, :24] - [200, 40, 40]).max() > 20
    redrawn = webui.img2img(images=[source], prompt="a blue circle", seed=5, width=64, height=64,
                            sampler_name="DDIM", steps=10, denoising_strength=0.5)
    assert redrawn.info["task"] == "img2img" and redrawn.image.size == (64, 64)


def test_webuiapi_reads_progress_models_samplers_and_options(webui, server):
    progress = webui.get_progress()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image"}
    assert progress["state"]["job_count"] == 0 and 0 <= progress["progress"] <= 1
    models = webui.get_sd_models()
    assert [model["model_name"] for model in models] == ["kandinsky3-tiny"]
    assert set(models[0]) >= {"title", "model_name", "hash", "filename"}
    samplers = {sampler["name"]: sampler["aliases"] for sampler in webui.get_samplers()}
    assert samplers["DPM++ 2M"][0] == "dpmpp_2m" and samplers["DDIM"][0] == "ddim" and "Euler a" not in samplers
    webui.set_options({"sd_model_checkpoint": models[0]["title"], "jpeg_quality": 80})
    assert webui.get_options()["sd_model_checkpoint"] == models[0]["title"]


def test_png_info_reads_back_the_parameters_the_server_wrote(webui):
    result = webui.txt2img(prompt="a white dot", seed=42, width=64, height=64)
    info = webui.png_info(result.image)
    assert info.info.startswith("a white dot\n")
    assert json.loads(json.dumps(info.json))["parameters"]["Seed"] == "42"
