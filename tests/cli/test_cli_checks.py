"""Everything ``kandinsky3 generate|inpaint|img2img`` can check is checked before a model loads: each mistake is
one line on stderr and status 2, and nothing is written. Run in this process with loading made to fail."""

import pytest
from PIL import Image


def _refused(result, message: str) -> None:
    status, out, err = result
    assert status == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kandinsky3 ")
    assert "drawn at random" not in out  # a refused run announces no seed


@pytest.mark.parametrize("args, message", [
    (("--width", "0"), "width must be a positive multiple of 4, got 0"),
    (("--height", "-64"), "height must be a positive multiple of 4, got -64"),
    (("--width", "18", "--height", "16"), "width=18 is not a multiple of 4; the nearest valid sizes are 16 and 20"),
    (("--width", "100000", "--height", "100000"), "but cpu has"),
    (("--steps", "0"), "steps must be an int >= 1, got 0"),
    (("--num-images", "0"), "num_images_per_prompt must be an int >= 1, got 0"),
    (("--guidance-scale", "nan"), "guidance_scale must be a finite number, got nan"),
    (("--guidance-scale", "inf"), "guidance_scale must be a finite number, got inf"),
    (("--eta", "nan"), "eta must be a finite number, got nan"),
    (("--seed", "-5"), "seed must be an int in [0, 2**63 - 1]"),
    (("--decode-tile", "0"), "tile must be >= 2"),
    (("--negative-prompt", "blurry", "--guidance-scale", "0"), "a negative prompt needs guidance"),
    (("--device", "tpu"), "device 'tpu' is not a device"),
    (("--lora", "missing.safetensors:0.5"), "--lora missing.safetensors:0.5: no such file missing.safetensors"),
    ((), "no prompt"),
])
def test_arguments_are_checked_before_the_model_loads(main, model, tmp_path, args, message):
    prompt = () if args == () else ("a red circle",)
    _refused(main("generate", *prompt, "--model", model, "-o", str(tmp_path / "out.png"), *args), message)
    assert list(tmp_path.iterdir()) == []


def test_prompts_may_stand_on_both_sides_of_flags_and_unknown_flags_are_still_refused(main, model, tmp_path, capsys):
    from kandinsky3.cli import parse_args

    args = parse_args(["generate", "a red circle", "--seed", "1", "a blue square", "-o", "x.png", "a green triangle"])
    assert args.prompt == ["a red circle", "a blue square", "a green triangle"] and args.seed == 1
    # both prompts reach the run's own checks (not argparse's "unrecognized arguments")
    _refused(main("generate", "a red circle", "--width", "0", "a blue square", "--model", model,
                  "-o", str(tmp_path / "out.png")), "width must be a positive multiple of 4, got 0")
    assert list(tmp_path.iterdir()) == []
    for argv, leftover in ((["generate", "a red circle", "--bogus", "a blue square"], "--bogus a blue square"),
                           (["eval", "extra", "--num-prompts", "5"], "extra")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        assert exit_.value.code == 2 and f"unrecognized arguments: {leftover}" in capsys.readouterr().err


def test_the_size_multiple_is_the_models_own(main, tmp_path):
    """The bundled tiny model takes multiples of 64 (its U-Net downsamples 8×, its MoVQ 8×)."""
    _refused(main("generate", "a", "--model", "tiny", "--width", "96", "-o", str(tmp_path / "out.png")),
             "width=96 is not a multiple of 64; the nearest valid sizes are 64 and 128")


@pytest.mark.parametrize("flags", [("--steps", "8"), ("--eta", "1"), ("--guidance-scale", "2"),
                                   ("--negative-prompt", "red"), ("--sampler", "ddpm")])
def test_flash_refuses_what_it_would_ignore(main, flash_model, tmp_path, flags):
    name = flags[0][2:].replace("-", "_")
    _refused(main("generate", "a red circle", "--flash", "--model", flash_model, "-o", str(tmp_path / "out.png"),
                  "--width", "16", "--height", "16", *flags), f"it does not take ['{name}']")


@pytest.mark.parametrize("task, args, message", [
    ("img2img", ("--image", "missing.png"), "--image missing.png: no such file"),
    ("img2img", ("--image", "not_an_image.png"), "--image not_an_image.png: not an image file"),
    ("img2img", ("--image", "in.png", "--strength", "1.5"), "strength"),
    ("img2img", ("--image", "in.png", "--strength", "nan"), "strength must be a finite number"),
    ("inpaint", ("--image", "in.png", "--mask", "missing.png"), "--mask missing.png: no such file"),
    ("inpaint", ("--image", "in.png", "--mask", "small.png"), "mask"),
])
def test_input_images_and_task_options_are_checked_before_the_model_loads(main, tmp_path, task, args, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    _refused(main(task, "a red circle", "--model", "tiny", *args, cwd=tmp_path), message)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "seed": 1', "prompts.txt:2: not a JSON object"),
    ('{"prompt": "a", "guidance": 3}', "prompts.txt:2: unknown keys ['guidance']"),
    ('{"seed": 3}', 'prompts.txt:2: a JSON line needs a "prompt" string'),
    ('{"prompt": "a", "steps": 0}', "prompts.txt:2: steps must be an int >= 1"),
    ('{"prompt": "a", "width": "wide"}', "prompts.txt:2: width must be a positive int"),
    ('{"prompt": "a", "strength": 0.5}', "prompts.txt:2: unknown keys ['strength']"),
])
def test_prompts_file_mistakes_name_the_line(main, model, tmp_path, line, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red circle\n{line}\n", encoding="utf-8")
    _refused(main("generate", "--prompts", str(prompts), "--model", model, "-o", str(tmp_path / "out.png")), message)
    assert list(tmp_path.iterdir()) == [prompts]


def test_a_missing_prompts_file_is_one_line(main, model, tmp_path):
    _refused(main("generate", "--prompts", str(tmp_path / "none.txt"), "--model", model, "-o",
                  str(tmp_path / "out.png")), "none.txt")


@pytest.mark.parametrize("output, message", [
    ("out", "the output must be a .png file"),
    ("out.jpg", "the output must be a .png file"),
    ("missing/out.png", "the folder"),
    ("a_file/out.png", "is not a folder"),
    ("a_folder.png", "is a folder"),
])
def test_bad_outputs_are_refused(main, tmp_path, output, message):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder.png").mkdir()
    _refused(main("generate", "a red circle", "--model", "tiny", "-o", str(tmp_path / output)), message)


def test_an_unwritable_output_folder_is_refused(main):
    """/proc refuses new files even to root (a chmod'ed folder would not stop root)."""
    _refused(main("generate", "a red circle", "--model", "tiny", "-o", "/proc/out.png"), "cannot write in /proc")


def test_existing_outputs_are_refused_without_overwrite(main, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"the user's picture")
    _refused(main("generate", "a red circle", "--model", "tiny", "-o", str(out)),
             "out.png already exists; pass --overwrite")
    (tmp_path / "many_1.png").write_bytes(b"kept")
    _refused(main("generate", "a red circle", "--num-images", "2", "--model", "tiny", "-o", str(tmp_path / "many.png")),
             "many_1.png already exists")
    assert out.read_bytes() == b"the user's picture" and (tmp_path / "many_1.png").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many_1.png", "out.png"]
