"""The web UI without a browser: form → request, editor → mask, the progress bar, a job followed to its end,
cancel, and the page's components. The browser test (test_ui_browser.py) drives the same page in Chromium."""

import asyncio

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web UI needs gradio (the `serve` extra)")

from kandinsky3.serve import ui  # noqa: E402
from kandinsky3.serve.ui import JobStatus, UIRequest  # noqa: E402


def request(**changes) -> UIRequest:
    fields = dict(mode="txt2img", prompt="a red circle", negative_prompt=None, width=64, height=64, steps=3,
                  guidance_scale=3.0, sampler="original", seed=7, batch=1)
    return UIRequest(**{**fields, **changes})


class ScriptedBackend:
    """A queue whose job answers each poll with the next status of ``script`` (the last one repeats)."""

    def __init__(self, script, refuse: str | None = None):
        self.script, self.refuse = list(script), refuse
        self.submitted, self.cancelled, self.polls = [], [], 0
        self.lora_names = ["style", "words"]

    def submit(self, req):
        if self.refuse:
            raise ValueError(self.refuse)
        self.submitted.append(req)
        return len(self.submitted)

    def poll(self, handle):
        self.polls += 1
        return self.script[min(self.polls - 1, len(self.script) - 1)]

    def cancel(self, handle):
        self.cancelled.append(handle)

    def loras(self, refresh=False):
        self.refreshed = getattr(self, "refreshed", 0) + refresh
        return list(self.lora_names)


def collect(agen, limit=None):
    async def run():
        out = []
        async for item in agen:
            out.append(item)
            if limit is not None and len(out) == limit:
                await agen.aclose()
                break
        return out

    return asyncio.run(run())


def progress_of(markup: str) -> tuple[str, int, int]:
    """(data-state, data-step, data-steps) of the progress bar's markup."""
    def attribute(name):
        return markup.split(f'{name}="', 1)[1].split('"', 1)[0]

    return attribute("data-state"), int(attribute("data-step")), int(attribute("data-steps"))


# ------------------------------------------------------------------------------------------------ form → request


def test_form_values_become_a_request_with_blank_negative_as_none_and_cleared_seed_as_random():
    values = ["  a cat  ", "  ", 128.0, 64.0, 20.0, 4.5, "ddim", None, 2.0]
    made = ui._request("txt2img", values)
    assert made == request(prompt="a cat", width=128, height=64, steps=20, guidance_scale=4.5, sampler="ddim",
                           seed=-1, batch=2)


def test_img2img_tab_needs_an_image_and_passes_it_as_rgb_with_strength():
    with pytest.raises(ValueError, match="upload an input image"):
        ui._tab_inputs("img2img", [None, 0.5])
    extra = ui._tab_inputs("img2img", [Image.new("RGBA", (64, 32)), 0.35])
    assert extra["image"].mode == "RGB" and extra["image"].size == (64, 32) and extra["strength"] == 0.35


# ------------------------------------------------------------------------------------------------ editor → mask


def editor_value(size=(48, 32), strokes=((10, 5, 20, 15),), layer_size=None):
    """An ImageEditor value: a blue background and one layer with opaque white boxes (x0, y0, x1, y1)."""
    layer = np.zeros((*(layer_size or size)[::-1], 4), dtype=np.uint8)
    for x0, y0, x1, y1 in strokes:
        layer[y0:y1, x0:x1] = 255
    background = Image.new("RGBA", size, (40, 90, 200, 255))
    return {"background": background, "layers": [Image.fromarray(layer)], "composite": background}


def test_painted_pixels_are_the_repaint_mask_at_the_image_size():
    image, mask = ui.inpainting_mask(editor_value())
    assert image.mode == "RGB" and image.size == (48, 32)
    assert mask.dtype == np.float32 and mask.shape == (32, 48)
    expected = np.zeros((32, 48), dtype=np.float32)
    expected[5:15, 10:20] = 1
    np.testing.assert_array_equal(mask, expected)


def test_painted_layer_of_another_size_is_scaled_to_the_image():
    _, mask = ui.inpainting_mask(editor_value(size=(48, 32), strokes=((0, 0, 48, 32),), layer_size=(96, 64)))
    _, half = ui.inpainting_mask(editor_value(size=(48, 32), strokes=((0, 0, 48, 64),), layer_size=(96, 64)))
    assert mask.shape == half.shape == (32, 48)
    assert mask[:16, :24].all() and not mask[16:].any() and not mask[:, 24:].any()
    assert half[:, :24].all() and not half[:, 24:].any()


def test_inpainting_refuses_no_image_and_an_unpainted_image():
    with pytest.raises(ValueError, match="upload an image"):
        ui.inpainting_mask(None)
    with pytest.raises(ValueError, match="paint the area"):
        ui.inpainting_mask(editor_value(strokes=()))


# ------------------------------------------------------------------------------------------------ progress bar


def test_progress_bar_reports_each_state():
    assert progress_of(ui.progress_html(None)) == ("idle", 0, 1)
    assert progress_of(ui.progress_html(JobStatus("running", step=3, steps=50))) == ("running", 3, 50)
    done = ui.progress_html(JobStatus("done", step=50, steps=50, images=(Image.new("RGB", (8, 8)),) * 2,
                                      seeds=(5, 6)))
    assert progress_of(done) == ("done", 50, 50) and "2 image(s), seed 5, 6" in done
    assert "3 job(s) ahead" in ui.progress_html(JobStatus("queued", position=3))
    failed = ui.progress_html(JobStatus("failed", message="width=70 <is not> a multiple of 32"))
    assert progress_of(failed)[0] == "failed" and "&lt;is not&gt;" in failed  # the message is escaped


def test_gallery_captions_name_each_images_seed():
    images = (Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)))
    items = ui.gallery_items(JobStatus("done", images=images, seeds=(11, 12)))
    assert [caption for _, caption in items] == ["seed 11", "seed 12"]
    assert items[0][0] is images[0]


# ------------------------------------------------------------------------------------------------ following a job


def test_following_a_job_shows_each_new_step_then_the_images(monkeypatch):
    monkeypatch.setattr(ui, "POLL_SECONDS", 0)
    picture = Image.new("RGB", (8, 8), "red")
    script = [JobStatus("queued", position=1), JobStatus("running", 1, 3), JobStatus("running", 1, 3),
              JobStatus("running", 3, 3), JobStatus("done", 3, 3, images=(picture,), seeds=(9,))]
    backend = ScriptedBackend(script)
    updates = collect(ui._Sessions(backend).follow("session", request()))
    states = [progress_of(markup)[:2] for markup, _ in updates]
    assert states == [("queued", 0), ("running", 1), ("running", 3), ("done", 3)]  # each new state once
    assert all(isinstance(gallery, type(gr.skip())) for _, gallery in updates[:-1])
    assert updates[-1][1] == [(picture, "seed 9")]
    assert backend.submitted == [request()] and backend.cancelled == []


def test_a_refused_request_shows_the_reason_and_queues_nothing():
    backend = ScriptedBackend([], refuse="the queue is full (4 jobs waiting); retry in about 3 s")
    (markup, gallery), = collect(ui._Sessions(backend).follow("session", request()))
    assert "refused: the queue is full" in markup and backend.polls == 0


def test_cancel_reaches_the_job_of_the_session_that_pressed_it(monkeypatch):
    monkeypatch.setattr(ui, "POLL_SECONDS", 0)
    backend = ScriptedBackend([JobStatus("running", 1, 50), JobStatus("running", 2, 50), JobStatus("cancelled")])
    sessions = ui._Sessions(backend)

    async def run():
        follower = sessions.follow("mine", request())
        first = await follower.__anext__()
        sessions.cancel("someone else")  # another browser's Cancel reaches nothing of ours
        sessions.cancel("mine")
        rest = [update async for update in follower]
        return [first, *rest]

    updates = asyncio.run(run())
    assert backend.cancelled == [1]
    assert progress_of(updates[-1][0])[0] == "cancelled"
    assert "mine" not in sessions.jobs


def test_leaving_before_the_end_cancels_the_job(monkeypatch):
    monkeypatch.setattr(ui, "POLL_SECONDS", 0)
    backend = ScriptedBackend([JobStatus("running", 1, 50), JobStatus("running", 2, 50)])
    sessions = ui._Sessions(backend)
    collect(sessions.follow("session", request()), limit=2)  # the page closed after two updates
    assert backend.cancelled == [1] and sessions.jobs == {}


# ------------------------------------------------------------------------------------------------ the page


def test_settings_come_from_the_bundled_models_defaults(tiny_engine):
    settings = ui.settings_for(tiny_engine.text_to_image, inpainting=False, max_batch=4)
    assert (settings.width, settings.height, settings.size_step) == (128, 128, 64)
    recorded = tiny_engine.text_to_image.sampling_defaults
    assert (settings.steps, settings.guidance_scale, settings.sampler) == (50, recorded.guidance_scale, "original")
    assert recorded.guidance_scale == 1.5
    assert settings.samplers == ("original", "original30", "ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
    assert settings.img2img_samplers == ("original", "ddpm", "ddim")
    assert settings.inpainting is False and settings.max_batch == 4


def test_page_has_the_form_the_tabs_the_progress_gallery_and_cancel():
    settings = ui.UISettings(width=64, height=64, size_step=32, max_side=256, title="Kandinsky 3 (tiny)")
    blocks = ui.build_ui(ScriptedBackend([]), settings)
    by_id = {block.elem_id: block for block in blocks.blocks.values() if getattr(block, "elem_id", None)}
    for elem_id in ("prompt", "negative-prompt", "width", "height", "steps", "guidance", "sampler", "seed", "batch",
                    "generate", "img2img-image", "strength", "img2img-generate", "inpaint-editor",
                    "inpaint-generate", "progress", "gallery", "cancel"):
        assert elem_id in by_id, elem_id
    assert (by_id["width"].minimum, by_id["width"].maximum, by_id["width"].step) == (32, 256, 32)
    assert by_id["width"].value == 64 and by_id["seed"].value == -1
    assert isinstance(by_id["inpaint-editor"], gr.ImageEditor)
    clicks = [fn for fn in blocks.fns.values() if fn.name != "cancel_job"]
    assert len(clicks) == 3 and all(fn.concurrency_limit is None for fn in clicks)  # the server's queue governs


def _page(settings, backend):
    blocks = ui.build_ui(backend, settings)
    by_id = {block.elem_id: block for block in blocks.blocks.values() if getattr(block, "elem_id", None)}
    return blocks, by_id


def test_the_lora_picker_shows_when_the_server_offers_loras_and_writes_tags_into_the_prompt():
    backend = ScriptedBackend([])
    _, plain = _page(ui.UISettings(), backend)
    assert not {"lora", "lora-weight", "lora-add", "lora-refresh"} & set(plain)
    blocks, by_id = _page(ui.UISettings(loras=True), backend)
    assert by_id["lora"].choices == [("style", "style"), ("words", "words")] and by_id["lora"].value == "style"
    assert by_id["lora-weight"].value == 1.0
    fns = {fn.name: fn.fn for fn in blocks.fns.values()}
    assert fns["add_tag"]("a red circle", "style", 0.5) == "a red circle <lora:style:0.5>"
    assert fns["add_tag"]("a red circle <lora:style:0.5>", "style", 1.0) == "a red circle <lora:style:1>"
    assert isinstance(fns["add_tag"]("a red circle", None, 1.0), type(gr.skip()))  # nothing chosen: unchanged
    backend.lora_names = ["words", "new"]
    update = fns["rescan"]("style")  # the chosen LoRA is gone: the first one found is chosen
    assert backend.refreshed == 1 and update.choices == [("words", "words"), ("new", "new")]
    assert update.value == "words" and fns["rescan"]("new").value == "new"
