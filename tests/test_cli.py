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


def _image_and_mask(folder, side: int):
    image, mask = folder / "in.png", folder / "mask.png"
    Image.fromarray((np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)).save(image)
    Image.fromarray(np.pad(np.full((side // 2, side // 2), 255, np.uint8), side // 4)).save(mask)
    return str(image), str(mask)


def test_inpaint_and_img2img_run_from_the_command_line(tmp_path):
    """The bundled tiny model has an inpainting variant: inpaint repaints the masked square and keeps the rest;
    img2img writes an image of the input's size."""
    image, mask = _image_and_mask(tmp_path, 64)
    inpainted = run_cli("inpaint", "a red circle", "--model", "tiny", "--image", image, "--mask", mask,
                        "-o", str(tmp_path / "inpainted.png"), "--steps", "2", "--no-progress")
    assert inpainted.returncode == 0, inpainted.stderr
    before, after = (np.asarray(Image.open(p), dtype=np.int16) for p in (image, tmp_path / "inpainted.png"))
    keep = np.asarray(Image.open(mask)) == 0
    assert after.shape == before.shape
    assert np.array_equal(after[keep], before[keep]) and np.abs(after[~keep] - before[~keep]).mean() > 1
    result = run_cli("img2img", "a blue square", "--model", "tiny", "--image", image, "-o",
                     str(tmp_path / "i2i.png"), "--steps", "4", "--strength", "0.5", "--no-progress",
                     "--decode-tile", "4")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "i2i.png").size == (64, 64)


def test_inpainting_a_base_only_model_is_refused_in_one_line(model, tmp_path):
    image, mask = _image_and_mask(tmp_path, 16)
    refused = run_cli("inpaint", "a", "--model", model, "--image", image, "--mask", mask, "-o",
                      str(tmp_path / "x.png"), "--no-progress")
    assert refused.returncode == 2 and "variant 'inpainting'" in refused.stderr and "Traceback" not in refused.stderr


def test_generate_renders_at_the_models_own_size_and_logs_the_placement(tmp_path):
    """No --width/--height: the size recorded by the model (64 px for the bundled tiny model); the automatic
    placement is said in one line."""
    result = run_cli("generate", "a red circle", "--model", "tiny", "-o", str(tmp_path / "tiny.png"), "--steps", "2",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "tiny.png").size == (64, 64)
    assert sum("placement" in line for line in result.stderr.splitlines()) == 1


def test_a_bug_keeps_its_traceback_and_is_not_reported_as_a_user_error(monkeypatch, capsys):
    """Only the library's checks are user errors (one line, status 2); a TypeError from a bug propagates."""
    from kandinsky3 import cli
    from kandinsky3.errors import UsageError

    def bug(args):
        raise TypeError("unsupported operand type(s)")

    def mistake(args):
        raise UsageError("width=18 is not a multiple of 64")

    monkeypatch.setattr(cli, "run_generate", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        cli.main(["generate", "a"])
    monkeypatch.setattr(cli, "run_generate", mistake)
    assert cli.main(["generate", "a"]) == 2
    assert capsys.readouterr().err.strip() == "kandinsky3 generate: error: width=18 is not a multiple of 64"


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
