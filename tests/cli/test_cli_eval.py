"""``kandinsky3 eval`` shows its progress (the default run takes minutes): a bar over the prompts of each split."""

import pytest
from PIL import Image

from kandinsky3 import cli, command, evaluation
from kandinsky3.evaluation import evaluate


def _blank(prompts, seed):
    return [Image.new("RGB", (32, 32), (128, 128, 128)) for _ in prompts]


def test_evaluate_draws_a_progress_bar_over_the_prompts_when_asked(capsys):
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"]
    evaluate(_blank, prompts, batch_size=2, progress=True, desc="checking")
    err = capsys.readouterr().err
    assert "checking" in err and "5/5" in err and "prompt" in err
    evaluate(_blank, prompts, batch_size=2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags, shown", [((), True), (("--no-progress",), False)])
def test_eval_command_shows_a_bar_per_split_unless_told_not_to(monkeypatch, capsys, flags, shown):
    monkeypatch.setattr(command, "set_threads", lambda: None)
    monkeypatch.setattr(evaluation, "movq_psnr", lambda movq: 0.0)  # 200 autoencoder passes: not what is tested here
    assert cli.main(["eval", "--num-prompts", "2", "--steps", "2", *flags]) == 0
    err = capsys.readouterr().err
    for split in ("seen", "heldout"):
        assert (f"text-to-image, {split} prompts" in err and "2/2" in err) == shown, err


def test_eval_inpainting_reports_the_drift_before_paste_back_too(monkeypatch, capsys):
    """With paste-back the kept pixels are the input's (drift 0); the second report is the network's own output
    there, which is what shows whether the inpainting U-Net reads its kept-image channels."""
    import json

    monkeypatch.setattr(command, "set_threads", lambda: None)
    monkeypatch.setattr(evaluation, "movq_psnr", lambda movq: 0.0)
    assert cli.main(["eval", "--num-prompts", "2", "--steps", "2", "--inpainting", "--no-progress"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[:out.rindex("}") + 1])
    assert report["inpainting"]["outside_mad"] == 0.0 and report["inpainting"]["num_prompts"] == 2
    assert report["inpainting_before_paste_back"]["outside_mad"] > 0.0
