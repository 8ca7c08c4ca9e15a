"""Bad input over raw HTTP: a 4xx with the reason, in each API's error shape; never a 422, never a traceback."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from kandinsky3.serve.errors import ApiError, a1111_body, openai_body


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60) as c:
        yield c


def b64_png(size=(64, 64), mode="RGB", color=(10, 20, 30)) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def a1111_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and "Traceback" not in response.text
    return body["detail"]


def openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in response.text
    return error


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"prompt": "x", "steps": "ten"}', "steps must be an integer"),
    (b'{"prompt": "x", "cfg_scale": [1]}', "cfg_scale must be a finite number"),
    (b'{"prompt": ""}', "prompt must be a non-empty string"),
    (b'{"prompt": "x", "width": 1024, "height": 64}', "width must be in [1, 512]"),
    (b'{"prompt": "x", "steps": 1000}', "steps must be in [1, 60]"),
    (b'{"prompt": "x", "batch_size": 3, "n_iter": 2}', "1 to 4 images"),
    (b'{"prompt": "x", "sampler_name": "Euler a"}', "'DPM++ 2M' (dpmpp_2m)"),
    (b'{"prompt": "x", "sampler_name": "DPM++ 2M", "scheduler": "Karras"}', "use 'automatic'"),
    (b'{"prompt": "x", "cfg_scale": 0.5}', "cfg_scale must be in [1.0"),
    (b'{"prompt": "x", "seed": -5}', "seed must be in [-1"),
])
def test_a1111_txt2img_refuses_bad_input_with_the_reason(http, body, reason):
    detail = a1111_error(http.post("/sdapi/v1/txt2img", content=body), 400)
    assert reason in detail


def test_a1111_size_off_the_multiple_names_the_nearest_sizes(http, server):
    multiple = server.service.engine.multiple
    detail = a1111_error(http.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": multiple + 5}), 400)
    assert f"nearest valid sizes are {multiple} and {2 * multiple}" in detail


def test_a1111_unknown_fields_are_ignored_never_a_422(http):
    body = {"prompt": "x", "steps": 2, "sampler_name": "DDIM", "width": 64, "height": 64, "enable_hr": True,
            "restore_faces": True, "alwayson_scripts": {"ControlNet": {"args": []}}, "override_settings": {"a": 1},
            "some_future_field": [1, {"b": None}]}
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200 and len(response.json()["images"]) == 1


@pytest.mark.parametrize("change, reason", [
    ({"init_images": ["bm90IGFuIGltYWdl"]}, "could not be decoded as an image"),
    ({"init_images": ["%%%"]}, "could not be decoded"),
    ({"init_images": []}, "init_images must hold one image"),
    ({"mask": b64_png((32, 32), "L", 255)}, "they must have the same size"),
    ({"mask": b64_png((64, 64), "L", 0)}, "nothing to repaint"),
    ({"sampler_name": "DPM++ 2M"}, "img2img supports"),
])
def test_a1111_img2img_refuses_bad_images_masks_and_samplers(http, change, reason):
    body = {"prompt": "x", "init_images": [b64_png()], "steps": 4, "width": 64, "height": 64, **change}
    if "mask" in change:
        body.pop("width"), body.pop("height")
    assert reason in a1111_error(http.post("/sdapi/v1/img2img", json=body), 400)


def test_a1111_accepts_data_urls_and_an_inverted_mask(http):
    mask = b64_png((64, 64), "L", 255)  # all white: inverted, nothing is repainted
    body = {"prompt": "x", "init_images": ["data:image/png;base64," + b64_png()], "mask": mask, "steps": 2}
    assert http.post("/sdapi/v1/img2img", json=body).status_code == 200
    assert "nothing to repaint" in a1111_error(
        http.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1}), 400)


def test_the_api_key_is_required_as_bearer_or_basic(server):
    body = {"prompt": "x", "steps": 1, "sampler_name": "DDIM"}
    anonymous = httpx.post(server.url + "/sdapi/v1/txt2img", json=body)
    assert "API key" in a1111_error(anonymous, 401) and anonymous.headers["www-authenticate"].startswith("Basic")
    assert httpx.post(server.url + "/sdapi/v1/txt2img", json=body, auth=("user", server.api_key),
                      timeout=60).status_code == 200
    assert openai_error(httpx.get(server.url + "/v1/models", auth=("user", server.api_key)), 401)["type"] == \
        "authentication_error"  # /v1 takes Bearer only


def test_bodies_over_the_limit_get_413(http):
    big = b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}'
    assert "over the limit" in a1111_error(http.post("/sdapi/v1/txt2img", content=big), 413)

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(6):
            yield b"x" * 2**20
        yield b'"}'

    assert "over the limit" in a1111_error(http.post("/sdapi/v1/txt2img", content=chunks()), 413)


@pytest.mark.parametrize("body, param, reason", [
    ({"prompt": ""}, "prompt", "non-empty"),
    ({"prompt": "x", "n": 0}, "n", "n must be in [1, 4]"),
    ({"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format", "'b64_json' or 'url'"),
])
def test_openai_generations_refuse_bad_input_in_the_openai_error_shape(http, body, param, reason):
    error = openai_error(http.post("/v1/images/generations", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param and reason in error["message"]


def test_openai_size_off_the_multiple_and_invalid_json(http, server):
    multiple = server.service.engine.multiple
    error = openai_error(http.post("/v1/images/generations", json={"prompt": "x", "size": f"{multiple + 1}x64"}), 400)
    assert "nearest valid sizes" in error["message"]
    assert "not valid JSON" in openai_error(http.post("/v1/images/generations", content=b"{"), 400)["message"]


def test_openai_edits_refuse_a_mask_without_alpha_or_of_another_size(http):
    image = base64.b64decode(b64_png())
    for mask, reason in ((b64_png((64, 64), "L", 0), "alpha channel"), (b64_png((32, 32), "RGBA", (0, 0, 0, 0)),
                                                                       "same size")):
        files = {"image": ("i.png", image, "image/png"), "mask": ("m.png", base64.b64decode(mask), "image/png")}
        error = openai_error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files), 400)
        assert error["param"] == "mask" and reason in error["message"]
    files = {"image": ("i.png", b"not an image", "image/png")}
    assert "could not be decoded" in openai_error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files),
                                                  400)["message"]


def test_unknown_paths_are_json_404s(http):
    assert openai_error(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert a1111_error(http.get("/sdapi/v1/nothing"), 404) == "Not Found"


def test_an_unexpected_error_is_a_500_that_tells_nothing_of_the_inside(caplog):
    error = ApiError.of(RuntimeError("secret path /home/x/model.bin"))
    assert error.status == 500 and "secret" not in str(a1111_body(error)) + str(openai_body(error))
    assert "secret path" in caplog.text  # but the log has it
