"""The web UI in a real browser: ``kandinsky3 serve --model tiny`` in a subprocess, Debian's Chromium driven by
Selenium through Debian's chromedriver (nothing is downloaded). Text to image with the progress bar moving, a
cancelled job, img2img, inpainting with a mask drawn by dragging the mouse on the editor's canvas, and a LoRA of
the server's --lora-dir picked into the prompt.

Screenshots of each stage are saved in the test's tmp folder (their paths are printed; ``pytest -s`` shows them).
"""

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs Chromium and its driver at {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium "
                "chromium-driver; .ci/run installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

BLUE = (40, 90, 200)
READ_PROGRESS = """
const bar = document.querySelector('#progress .k3-progress');
return bar ? [bar.dataset.state, Number(bar.dataset.step), Number(bar.dataset.steps), bar.innerText] : null;
"""


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """``kandinsky3 serve --model tiny --lora-dir D`` on a free loopback port, D holding one LoRA ("style") made
    from the tiny model; the server's log is shown if it does not come up."""
    from conftest import write_random_lora

    from kandinsky3 import load_pipeline

    loras = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline("text-to-image", "tiny", device="cpu")
    write_random_lora(loras / "style.safetensors", pipe.unet, pipe.text_encoder, ("attention",), 0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kandinsky3.cli", "serve", "--model", "tiny", "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(port), "--lora-dir", str(loras)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not come up:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server_url, tmp_path):
    """The page freshly loaded, and a function that saves a named screenshot in tmp_path."""
    browser.get(server_url)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 30, "the page to load")

    def shot(name: str):
        path = tmp_path / f"{name}.png"
        browser.save_screenshot(str(path))
        print(f"screenshot: {path}")

    return browser, shot


SLACK = 6  # CI shares 2 cores with other jobs: a wait ends as soon as its condition holds, so a long limit is free


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + SLACK * seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def set_number(driver, elem_id: str, value) -> None:
    """Type into a slider's (or number's) number box and leave it, as a user does."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.clear()
    box.send_keys(str(value), "\t")


def watch_progress(driver, until_states=("done", "failed", "cancelled", "idle"), seconds=60.0, on_step=None):
    """Read the progress bar every 30 ms until it reaches one of ``until_states`` after having left "idle";
    returns every (state, step, steps, text) seen. ``on_step(reading)`` runs on each new reading."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        reading = tuple(driver.execute_script(READ_PROGRESS))
        if not seen or reading != seen[-1]:
            seen.append(reading)
            if on_step is not None:
                on_step(reading)
        started = any(state != "idle" for state, *_ in seen)
        if reading[0] in until_states and (started or reading[0] != "idle" or "refused" in reading[3]):
            return seen
        time.sleep(0.03)
    raise AssertionError(f"the job did not end; progress seen: {seen[-5:]}")


def gallery_images(driver) -> list[Image.Image]:
    """The gallery's images, fetched from the server as the browser shows them."""
    sources = [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#gallery img")]
    images = []
    for source in dict.fromkeys(sources):  # the preview and its thumbnail show the same file
        with urllib.request.urlopen(source, timeout=10) as response:
            images.append(Image.open(io.BytesIO(response.read())).convert("RGB"))
    return images


def open_tab(driver, label: str) -> None:
    next(tab for tab in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text == label).click()


def test_generate_moves_the_progress_bar_and_shows_the_image(page):
    driver, shot = page
    driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a red circle on a blue background")
    set_number(driver, "steps", 60)
    set_number(driver, "seed", 1234)
    driver.find_element(By.ID, "generate").click()
    shots = []

    def shoot_once_midway(reading):
        if reading[0] == "running" and reading[1] >= 20 and not shots:
            shots.append(shot("1-txt2img-running"))

    seen = watch_progress(driver, on_step=shoot_once_midway)
    running = [step for state, step, steps, _ in seen if state == "running" and 0 < step < steps]
    assert seen[-1][0] == "done", seen[-1]
    assert len(set(running)) >= 3 and running == sorted(running), f"the bar did not move: {seen}"
    assert "seed 1234" in seen[-1][3]
    images = wait_until(lambda: gallery_images(driver), 10, "an image in the gallery")
    shot("2-txt2img-done")
    assert len(images) == 1 and images[0].size == (128, 128)  # the model's own size
    assert np.asarray(images[0]).std() > 5, "the image is flat"


def test_cancel_stops_the_running_job(page):
    driver, shot = page
    driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a long job")
    set_number(driver, "steps", 150)
    set_number(driver, "width", 128)
    driver.find_element(By.ID, "generate").click()
    wait_until(lambda: driver.execute_script(READ_PROGRESS)[1] >= 5, 30, "the job to run")
    driver.find_element(By.ID, "cancel").click()
    seen = watch_progress(driver, seconds=15)
    shot("3-cancelled")
    assert seen[-1][0] == "cancelled" and seen[-1][1] < 150, seen[-3:]
    assert driver.find_elements(By.CSS_SELECTOR, "#gallery img") == []


def test_img2img_turns_the_uploaded_image_into_one_of_the_form_size(page, tmp_path):
    driver, shot = page
    source = tmp_path / "red.png"
    Image.new("RGB", (100, 70), (200, 30, 30)).save(source)  # sides that are no multiple of 64: the form's size
    driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a blue square")
    open_tab(driver, "Image to image")
    upload = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#img2img-image input[type=file]"), 10,
                        "the image input")[0]
    upload.send_keys(str(source))
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#img2img-image img"), 10, "the uploaded image")
    set_number(driver, "strength", 0.6)
    driver.find_element(By.ID, "img2img-generate").click()
    seen = watch_progress(driver)
    assert seen[-1][0] == "done", seen[-1]
    images = wait_until(lambda: gallery_images(driver), 10, "the img2img result")
    shot("4-img2img")
    assert images[0].size == (128, 128)  # the form's size, the model's own, not the upload's
    assert np.abs(np.asarray(images[0]).astype(int) - (200, 30, 30)).mean() > 10, "the image came back unchanged"


def test_inpainting_repaints_the_drawn_mask_and_keeps_the_rest(page, tmp_path):
    driver, shot = page
    source = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), BLUE).save(source)
    driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a red circle")
    open_tab(driver, "Inpainting")
    editor = wait_until(lambda: driver.find_elements(By.ID, "inpaint-editor"), 10, "the editor")[0]
    editor.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(source))
    wait_until(lambda: "Upload an image" not in editor.text, 10, "the image in the editor")
    editor.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
    canvas = editor.find_elements(By.CSS_SELECTOR, "canvas")[-1]
    stroke = ActionChains(driver, duration=0).move_to_element_with_offset(canvas, -30, 0).click_and_hold()
    for x in (-10, 10, 30):  # a horizontal drag through the middle of the image (each move redraws the canvas)
        stroke.move_to_element_with_offset(canvas, x, 0)
    stroke.release().perform()
    shot("5-mask-drawn")
    driver.find_element(By.ID, "inpaint-generate").click()
    seen = watch_progress(driver)
    assert seen[-1][0] == "done", seen[-1]
    images = wait_until(lambda: gallery_images(driver), 10, "the inpainted image")
    shot("6-inpainted")
    pixels = np.asarray(images[0]).astype(int)  # (64, 64, 3)
    assert pixels.shape == (64, 64, 3)
    for corner in (pixels[:3, :3], pixels[:3, -3:], pixels[-3:, :3], pixels[-3:, -3:]):  # far from the stroke
        np.testing.assert_array_equal(corner, np.broadcast_to(BLUE, corner.shape))
    assert np.abs(pixels[28:36, 28:36] - BLUE).sum(axis=-1).min() > 30, "the painted middle was not repainted"


def test_a_picked_lora_goes_into_the_prompt_and_is_applied(page):
    driver, shot = page
    prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    prompt.send_keys("a red circle")
    set_number(driver, "steps", 4)
    set_number(driver, "seed", 7)
    driver.find_element(By.ID, "generate").click()
    assert watch_progress(driver)[-1][0] == "done"
    plain = wait_until(lambda: gallery_images(driver), 10, "the plain image")[0]
    set_number(driver, "lora-weight", 0.8)
    driver.find_element(By.ID, "lora-add").click()  # the list's first (and only) LoRA is chosen
    wait_until(lambda: prompt.get_attribute("value") == "a red circle <lora:style:0.8>", 10, "the tag in the prompt")
    driver.find_element(By.ID, "generate").click()
    seen = watch_progress(driver)
    assert seen[-1][0] == "done", seen[-1]
    styled = wait_until(lambda: (images := gallery_images(driver)) and images[0].tobytes() != plain.tobytes()
                        and images, 10, "the LoRA's image")[0]
    shot("6-lora")
    assert np.abs(np.asarray(styled).astype(int) - np.asarray(plain)).mean() > 1, "the LoRA changed nothing"
