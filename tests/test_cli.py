"""The ``kandinsky3`` command, run as a real subprocess on a tiny native checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest
from _checkpoints import write_native
from PIL import Image

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kandinsky3.cli", *args], capture_output=True, text=True, env=ENV, timeout=300
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_native(tmp_path_factory.mktemp("native") / "model").root)


def test_generate_writes_images_and_reports_where_and_how_long(model, tmp_path):
    out = tmp_path / "out.png"
    result = run_cli("generate", "a red circle", "--model", model, "-o", str(out), "--width", "16", "--height", "16",
                     "--steps", "2", "--num-images", "2", "--dtype", "fp32", "--no-progress")
    assert result.returncode == 0, result.stderr
    written = [tmp_path / "out_0.png", tmp_path / "out_1.png"]
    assert all(Image.open(p).size == (16, 16) for p in written)
    assert "wrote" in result.stdout and "out_1.png" in result.stdout and " s" in result.stdout


def test_low_memory_flags_give_the_same_image(model, tmp_path):
    """--stream-t5 yes, --offload disk and --dtype/--compute-dtype reach the loaders; fp32 storage + streaming +
    reading the U-Net and MoVQ at their phases changes nothing."""
    common = ("generate", "a red circle", "--model", model, "--width", "16", "--height", "16", "--steps", "2",
              "--dtype", "fp32", "--no-progress")
    plain = run_cli(*common, "-o", str(tmp_path / "a.png"), "--stream-t5", "no")
    streamed = run_cli(*common, "-o", str(tmp_path / "b.png"), "--stream-t5", "yes", "--compute-dtype", "fp32",
                       "--offload", "disk")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    a, b = (np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1


def test_inpaint_and_img2img_run_from_the_command_line(model, tmp_path):
    # the native test model holds only the base variant, so inpainting must refuse it with one clear line
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(image)
    Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 4)).save(mask)
    refused = run_cli("inpaint", "a", "--model", model, "--image", str(image), "--mask", str(mask), "-o",
                      str(tmp_path / "x.png"), "--no-progress")
    assert refused.returncode == 2 and "variant 'inpainting'" in refused.stderr and "Traceback" not in refused.stderr
    result = run_cli("img2img", "a blue square", "--model", model, "--image", str(image), "-o",
                     str(tmp_path / "i2i.png"), "--steps", "4", "--strength", "0.5", "--no-progress",
                     "--decode-tile", "4")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "i2i.png").size == (16, 16)


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "a", "--model", "/no/such/folder"), "no such checkpoint"),
        (("generate", "a", "--width", "18", "--height", "16"), "not a multiple of 4"),
    ],
)
def test_user_mistakes_give_one_clear_line_and_a_nonzero_exit(model, args, message):
    args = tuple(model if a == "MODEL" else a for a in args)
    if "--model" not in args:
        args = (*args, "--model", model)
    result = run_cli(*args, "--no-progress")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
