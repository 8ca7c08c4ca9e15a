"""``kandinsky3 generate|inpaint|img2img``: images, their PNG parameters, seeds, several prompts, output files."""

import json

import numpy as np
import pytest
from PIL import Image

from kandinsky3.png_info import parse_parameters, read_parameters

LOADED = "placement:"  # the log line of a model load: absent when a mistake is caught before loading
SMALL = ("--width", "16", "--height", "16", "--steps", "2", "--dtype", "fp32", "--no-progress")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_generate_writes_images_and_reports_where_and_how_long(cli, model, tmp_path):
    out = tmp_path / "out.png"
    result = cli("generate", "a red circle", "--model", model, "-o", str(out), *SMALL, "--num-images", "2",
                 "--seed", "5")
    assert result.returncode == 0, result.stderr
    written = [tmp_path / "out_0.png", tmp_path / "out_1.png"]
    assert all(Image.open(p).size == (16, 16) for p in written)
    assert f"wrote {written[0]} (seed 5)" in result.stdout and f"wrote {written[1]} (seed 6)" in result.stdout
    assert "2 images in" in result.stdout and " s" in result.stdout


def test_every_png_carries_its_generation_parameters(cli, model, tmp_path):
    out = tmp_path / "out.png"
    result = cli("generate", "a red circle", "--negative-prompt", "blurry", "--model", model, "-o", str(out), *SMALL,
                 "--seed", "7", "--guidance-scale", "2.5", "--sampler", "ddim", "--eta", "0.5")
    assert result.returncode == 0, result.stderr
    parameters = parse_parameters(read_parameters(out))
    assert {key: parameters[key] for key in ("Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed",
                                             "Size", "Model", "Eta")} == {
        "Prompt": "a red circle", "Negative prompt": "blurry", "Steps": "2", "Sampler": "ddim", "CFG scale": "2.5",
        "Seed": "7", "Size": "16x16", "Model": model, "Eta": "0.5"}


def test_parameters_record_the_models_choices_when_the_flags_leave_them_open(cli, tmp_path):
    """No --steps/--sampler/--guidance-scale: the PNG says what ran (the bundled model's own 128 px, 'original')."""
    out = tmp_path / "out.png"
    result = cli("generate", "a red circle", "--model", "tiny", "-o", str(out), "--seed", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    parameters = parse_parameters(read_parameters(out))
    assert (parameters["Sampler"], parameters["Steps"], parameters["CFG scale"], parameters["Size"]) == (
        "original", "50", "1.5", "128x128")


@pytest.mark.slow  # three runs of the command (~20 s): CI's second tier
def test_seed_defaults_to_a_random_one_that_is_printed_written_and_reproducible(cli, model, tmp_path):
    first, second = (cli("generate", "a red circle", "--model", model, "-o", str(tmp_path / name), *SMALL)
                     for name in ("a.png", "b.png"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    seeds = [int(parse_parameters(read_parameters(tmp_path / name))["Seed"]) for name in ("a.png", "b.png")]
    assert seeds[0] != seeds[1]  # drawn at random (equal with probability 2**-32)
    assert f"seed {seeds[0]} (drawn at random" in first.stdout
    again = cli("generate", "a red circle", "--model", model, "-o", str(tmp_path / "c.png"), *SMALL,
                "--seed", str(seeds[0]))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "c.png"))


@pytest.mark.slow  # two runs of the command, five images (~20 s): CI's second tier
def test_several_prompts_and_a_prompts_file_write_numbered_files(cli, model, tmp_path):
    """Positional prompts, then the file's plain and JSON lines; image k has seed base + k unless its line sets
    one; JSON lines override the flags for their prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a green triangle\n\n{"prompt": "a blue square", "seed": 99, "steps": 3, "width": 8, '
                       '"height": 12, "negative_prompt": "red", "num_images": 2}\n', encoding="utf-8")
    result = cli("generate", "a red circle", "--prompts", str(prompts), "a yellow circle", "--model", model,
                 "-o", str(tmp_path / "out.png"), *SMALL, "--seed", "10")  # positional prompts around the flags
    assert result.returncode == 0, result.stderr
    found = [parse_parameters(read_parameters(tmp_path / f"out_{k}.png")) for k in range(5)]
    assert [(p["Prompt"], p["Seed"], p["Steps"], p["Size"], p["Negative prompt"]) for p in found] == [
        ("a red circle", "10", "2", "16x16", ""), ("a yellow circle", "11", "2", "16x16", ""),
        ("a green triangle", "12", "2", "16x16", ""), ("a blue square", "99", "3", "8x12", "red"),
        ("a blue square", "100", "3", "8x12", "red")]
    alone = cli("generate", "a yellow circle", "--model", model, "-o", str(tmp_path / "alone.png"), *SMALL,
                "--seed", "11")
    assert np.array_equal(_pixels(tmp_path / "out_1.png"), _pixels(tmp_path / "alone.png")), alone.stderr


def test_prompts_can_come_from_standard_input(cli, model, tmp_path):
    result = cli("generate", "--prompts", "-", "--model", model, "-o", str(tmp_path / "out.png"), *SMALL,
                 stdin="a red circle\na blue square\n")
    assert result.returncode == 0, result.stderr
    assert [parse_parameters(read_parameters(tmp_path / f"out_{k}.png"))["Prompt"] for k in range(2)] == [
        "a red circle", "a blue square"]


def test_overwrite_replaces_an_existing_output(cli, model, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"the user's picture")
    replaced = cli("generate", "a red circle", "--model", model, "-o", str(out), *SMALL, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert Image.open(out).size == (16, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


def test_flash_writes_its_fixed_sampling_into_the_png(cli, flash_model, tmp_path):
    out = tmp_path / "out.png"
    result = cli("generate", "a red circle", "--flash", "--model", flash_model, "-o", str(out), "--width", "16",
                 "--height", "16", "--seed", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    parameters = parse_parameters(read_parameters(out))
    assert (parameters["Sampler"], parameters["Steps"], parameters["CFG scale"]) == ("flash", "4", "0.0")


def test_help_says_the_size_multiple_comes_from_the_model(cli):
    text = " ".join(cli("generate", "--help").stdout.split())
    assert "a multiple of the model's size step" in text and "64 for the released models and the" in text
    assert "bundled tiny one" in text and "multiple of 64;" not in text


def _image_and_mask(folder, side: int):
    image, mask = folder / "in.png", folder / "mask.png"
    Image.fromarray((np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)).save(image)
    Image.fromarray(np.pad(np.full((side // 2, side // 2), 255, np.uint8), side // 4)).save(mask)
    return str(image), str(mask)


@pytest.mark.slow  # two runs of the command (~20 s): CI's second tier
def test_inpaint_and_img2img_run_from_the_command_line(cli, tmp_path):
    """The bundled tiny model has an inpainting variant: inpaint repaints the masked square and keeps the rest;
    img2img writes an image of the input's size; both PNGs carry their parameters."""
    image, mask = _image_and_mask(tmp_path, 64)
    inpainted = cli("inpaint", "a red circle", "--model", "tiny", "--image", image, "--mask", mask,
                    "-o", str(tmp_path / "inpainted.png"), "--steps", "2", "--no-progress", "--seed", "3")
    assert inpainted.returncode == 0, inpainted.stderr
    before, after = _pixels(image), _pixels(tmp_path / "inpainted.png")
    keep = np.asarray(Image.open(mask)) == 0
    assert after.shape == before.shape
    assert np.array_equal(after[keep], before[keep]) and np.abs(after[~keep] - before[~keep]).mean() > 1
    assert parse_parameters(read_parameters(tmp_path / "inpainted.png"))["Seed"] == "3"
    result = cli("img2img", "a blue square", "--model", "tiny", "--image", image, "-o",
                 str(tmp_path / "i2i.png"), "--steps", "4", "--strength", "0.5", "--no-progress", "--decode-tile", "4")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "i2i.png").size == (64, 64)
    assert parse_parameters(read_parameters(tmp_path / "i2i.png"))["Denoising strength"] == "0.5"


@pytest.mark.slow  # streamed T5 and disk offload through the CLI: CI's second tier
def test_low_memory_flags_give_the_same_image(cli, model, tmp_path):
    """--stream-t5 yes, --offload disk and --dtype/--compute-dtype reach the loaders; fp32 storage + streaming +
    reading the U-Net and MoVQ at their phases changes nothing."""
    common = ("generate", "a red circle", "--model", model, *SMALL, "--seed", "0")
    plain = cli(*common, "-o", str(tmp_path / "a.png"), "--stream-t5", "no")
    streamed = cli(*common, "-o", str(tmp_path / "b.png"), "--stream-t5", "yes", "--compute-dtype", "fp32",
                   "--offload", "disk")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert np.abs(_pixels(tmp_path / "a.png") - _pixels(tmp_path / "b.png")).max() <= 1


def test_generate_renders_at_the_models_own_size_and_logs_the_placement(cli, tmp_path):
    """No --width/--height: the size recorded by the model (128 px for the bundled tiny model); the automatic
    placement is said in one line."""
    result = cli("generate", "a red circle", "--model", "tiny", "-o", str(tmp_path / "tiny.png"), "--steps", "2",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "tiny.png").size == (128, 128)
    assert sum("placement" in line for line in result.stderr.splitlines()) == 1


def test_inpainting_a_base_only_model_is_refused_in_one_line(cli, model, tmp_path):
    image, mask = _image_and_mask(tmp_path, 16)
    refused = cli("inpaint", "a", "--model", model, "--image", image, "--mask", mask, "-o", str(tmp_path / "x.png"),
                  "--no-progress")
    assert refused.returncode == 2 and "variant 'inpainting'" in refused.stderr and "Traceback" not in refused.stderr
