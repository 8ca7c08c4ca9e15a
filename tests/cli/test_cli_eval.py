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


def _fake_reports(monkeypatch, calls):
    """Record each report's pipeline task and settings instead of generating (the reports' own code is tested
    above)."""
    def fake(name):
        def run(pipe, num_prompts, **kwargs):
            calls[name] = pipe.task, kwargs
            return {"num_prompts": num_prompts, "before_paste_back": {}} if name == "inpainting" else {}
        return run

    monkeypatch.setattr(command, "set_threads", lambda: None)
    monkeypatch.setattr(evaluation, "movq_psnr", lambda movq: 0.0)
    monkeypatch.setattr(evaluation, "evaluate_text_to_image", fake("text_to_image"))
    monkeypatch.setattr(evaluation, "evaluate_inpainting", fake("inpainting"))


def test_eval_passes_the_settings_to_both_reports_and_prints_json_only(monkeypatch, capsys):
    """--guidance-scale, --sampler, --steps, --seed and --prompt-seed reach the text-to-image and the inpainting
    evaluation alike; without --prompt-seed each uses its own reported prompt set; stdout is one JSON document."""
    import json

    calls = {}
    _fake_reports(monkeypatch, calls)
    flags = ["--guidance-scale", "1.5", "--sampler", "ddim", "--steps", "7", "--seed", "3", "--no-progress"]
    assert cli.main(["eval", "--inpainting", "--prompt-seed", "99", *flags]) == 0
    json.loads(capsys.readouterr().out)
    for _, kwargs in calls.values():
        assert kwargs == {"guidance_scale": 1.5, "sampler": "ddim", "steps": 7, "seed": 3, "progress": False,
                          "prompt_seed": 99}
    assert cli.main(["eval", "--inpainting", *flags]) == 0
    assert set(calls) == {"text_to_image", "inpainting"}
    assert all("prompt_seed" not in kwargs for _, kwargs in calls.values())


def test_eval_reports_an_inpainting_folder_alone_and_pairs_folders_on_request(monkeypatch, capsys):
    """A folder holding an inpainting model (a training run's export) gets the inpainting report alone;
    ``--inpainting MODEL`` names the inpainting model that goes with a text-to-image folder."""
    import json

    from kandinsky3.pipelines.load import resolve_model

    base, inpainting = resolve_model("tiny", "base"), resolve_model("tiny", "inpainting")
    calls = {}
    _fake_reports(monkeypatch, calls)
    assert cli.main(["eval", "--model", str(inpainting), "--no-progress"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"inpainting", "inpainting_before_paste_back", "movq_psnr"}
    assert {name: task for name, (task, _) in calls.items()} == {"inpainting": "inpainting"}
    calls.clear()
    assert cli.main(["eval", "--model", str(base), "--inpainting", str(inpainting), "--no-progress"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"text_to_image", "inpainting"}
    assert {name: task for name, (task, _) in calls.items()} == {"text_to_image": "text-to-image",
                                                                  "inpainting": "inpainting"}


@pytest.mark.parametrize("flags, said", [
    (["--inpainting"], "holds the 'base' variant, but variant 'inpainting' was requested"),
    (["--inpainting", "BASE"], "holds the 'base' variant, but variant 'inpainting' was requested"),
    (["--model", "INPAINTING", "--inpainting", "INPAINTING"], "is an inpainting model; --inpainting MODEL goes with"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
])
def test_eval_refuses_a_wrong_model_before_any_report_runs(monkeypatch, capsys, flags, said):
    from kandinsky3.pipelines.load import resolve_model

    folders = {"BASE": str(resolve_model("tiny", "base")), "INPAINTING": str(resolve_model("tiny", "inpainting"))}
    calls = {}
    _fake_reports(monkeypatch, calls)
    model = [] if "--model" in flags else ["--model", folders["BASE"]]
    assert cli.main(["eval", *model, *[folders.get(f, f) for f in flags]]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err
    assert calls == {}
