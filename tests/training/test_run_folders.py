"""Run folders: a run never replaces an earlier run's outputs, ``--resume`` needs a checkpoint, run files are replaced
atomically; and a run's model inputs may be any model folder: fine-tuning the bundled model with
``configs/finetune_tiny.json``."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from _tiny_training import MOVQ, movq_config, one_thread, unet_config
from PIL import Image

from kandinsky3.cli import main as cli_main
from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.errors import UsageError
from kandinsky3.training import run_log
from kandinsky3.training.__main__ import main
from kandinsky3.training.checkpoint import CHECKPOINT, cached_file, save_checkpoint
from kandinsky3.training.config import config_to_dict
from kandinsky3.training.run_log import TrainingLog
from kandinsky3.training.train_movq import train_movq
from kandinsky3.training.train_unet import train_unet
from kandinsky3.weights.loading import load_components

_single_thread = pytest.fixture(autouse=True)(one_thread)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "kandinsky3" / "assets" / "tiny"


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _config_file(tmp_path: Path, out_dir: Path) -> Path:
    path = tmp_path / "movq.json"
    path.write_text(json.dumps(config_to_dict(movq_config(out_dir, MOVQ, "schedule.max_steps=2"))))
    return path


def _silent_logging(monkeypatch) -> None:
    """The command's logging setup attaches handlers to the package logger: not wanted inside the test process."""
    monkeypatch.setattr(run_log, "setup_logging", lambda *args, **kwargs: None)


# ------------------------------------------------------------------------------------------- new runs, resumed runs


def test_a_finished_run_is_not_replaced_by_a_new_one(tmp_path):
    """Training again into a run folder without resume stops before anything is written: checkpoint, log.csv,
    final/ and the rest stay byte for byte."""
    out = tmp_path / "run"
    train_movq(movq_config(out, MOVQ, "schedule.max_steps=2"))
    before = _snapshot(out)
    assert {CHECKPOINT, "log.csv", "final/kandinsky3.json"} <= before.keys()
    with pytest.raises(UsageError, match=r"holds a previous run \(checkpoint\.pt, log\.csv, final\).*--resume"):
        train_movq(movq_config(out, MOVQ, "schedule.max_steps=4"))
    assert _snapshot(out) == before


@pytest.mark.parametrize("output", [CHECKPOINT, "log.csv", "final", "samples"])
def test_any_output_of_an_earlier_run_marks_the_folder_as_taken(tmp_path, output):
    out = tmp_path / "run"
    out.mkdir()
    if output in ("final", "samples"):
        (out / output).mkdir()
        (out / output / "x").write_text("earlier")
    else:
        (out / output).write_text("earlier")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(UsageError, match=f"holds a previous run \\({output}\\)"):
        train_unet(unet_config(out, tmp_path / "movq"))
    assert _snapshot(out) == before


def test_the_command_refuses_an_earlier_run_in_one_line_before_writing(tmp_path, capsys, monkeypatch):
    _silent_logging(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.csv").write_text("step,loss\n1,0.5\n")
    before = _snapshot(out)
    assert cli_main(["train", str(_config_file(tmp_path, out))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --resume" in err and "run.out_dir" in err
    assert _snapshot(out) == before


def test_python_m_kandinsky3_training_refuses_an_earlier_run_in_one_line_too(tmp_path):
    """The module entry point (what torchrun runs) goes through the same guard as ``kandinsky3 train``."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    (out / "log.csv").write_text("step,loss\n1,0.5\n")
    done = subprocess.run([sys.executable, "-m", "kandinsky3.training", str(_config_file(tmp_path, out))],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "pass --resume" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_refused_for_its_inputs_leaves_no_folder(tmp_path, capsys):
    """A run whose inputs fail their checks (a missing starting MoVQ) ends with one line and status 2, and its run
    folder is not created: train.log opens at the first record, not when the command starts."""
    out = tmp_path / "run"
    logger = logging.getLogger("kandinsky3")
    before = (list(logger.handlers), logger.level, logger.propagate)
    try:
        status = cli_main(["train", str(_config_file(tmp_path, out)), f"decoder.finetune_from={tmp_path / 'none'}"])
    finally:  # the command attached its handlers to the package logger: put the test process's back
        for handler in set(logger.handlers) - set(before[0]):
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(before[1])
        logger.propagate = before[2]
    assert status == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path / "none") in error
    assert not out.exists()


def test_resume_without_a_checkpoint_is_an_error_that_writes_nothing(tmp_path, capsys, monkeypatch):
    _silent_logging(monkeypatch)
    out = tmp_path / "run"
    assert cli_main(["train", str(_config_file(tmp_path, out)), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no checkpoint.pt" in err
    assert not out.exists()
    # flags may stand between the config and its overrides (the usage line's order): the same refusal, not argparse's
    moved = tmp_path / "moved"
    assert cli_main(["train", str(_config_file(tmp_path, out)), "--resume", f"run.out_dir={moved}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no checkpoint.pt" in err and str(moved) in err
    assert not moved.exists()
    out.mkdir()
    (out / "log.csv").write_text("step,loss\n1,0.5\n")  # stopped before its first checkpoint
    with pytest.raises(UsageError, match="holds no checkpoint.pt .*remove it or set run.out_dir"):
        train_movq(movq_config(out, MOVQ), resume=True)
    assert _snapshot(out) == {"log.csv": b"step,loss\n1,0.5\n"}


def test_resume_refuses_up_front_a_final_folder_holding_the_users_files(tmp_path):
    out = tmp_path / "run"
    train_movq(movq_config(out, MOVQ, "schedule.max_steps=2"))
    (out / "final" / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(UsageError, match=r"final holds files kandinsky3 did not write \(notes\.txt\)"):
        train_movq(movq_config(out, MOVQ, "schedule.max_steps=3"), resume=True)
    assert _snapshot(out) == before


def test_a_resumed_run_replaces_its_own_export(tmp_path):
    out = tmp_path / "run"
    train_movq(movq_config(out, MOVQ, "schedule.max_steps=2"))
    train_movq(movq_config(out, MOVQ, "schedule.max_steps=3"), resume=True)
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_recipe_resume_continues_started_stages_and_starts_the_others(tmp_path, monkeypatch):
    _silent_logging(monkeypatch)
    calls = []
    monkeypatch.setattr("kandinsky3.training.train_unet.train_unet",
                        lambda config, resume: calls.append((Path(config.run.out_dir).name, resume)))
    common = config_to_dict(unet_config(tmp_path / "unused", tmp_path / "movq"))
    recipe = {"trainer": "recipe", "common": common,
              "stages": [{"run": {"out_dir": str(tmp_path / name)}} for name in ("s0", "s1")]}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    (tmp_path / "s0").mkdir()
    (tmp_path / "s0" / CHECKPOINT).write_bytes(b"stage 0 was interrupted")
    assert main([str(path), "--resume"]) == 0
    assert calls == [("s0", True), ("s1", False)]


# ------------------------------------------------------------------------------------------- atomic files


def test_an_interrupted_log_rewrite_keeps_the_previous_log(tmp_path, monkeypatch):
    """Resuming rewrites log.csv without the rows past the checkpoint: through a temporary file and a rename."""
    path = tmp_path / "log.csv"
    rows = "step,loss\n1,0.5\n2,0.4\n3,0.3\n"
    path.write_text(rows)

    def interrupted(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        TrainingLog(path, ["loss"], interval=1, resume_step=2, write=True)
    assert path.read_text() == rows and [p.name for p in tmp_path.iterdir()] == ["log.csv"]
    monkeypatch.undo()
    TrainingLog(path, ["loss"], interval=1, resume_step=2, write=True)
    assert path.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4"]


def test_an_interrupted_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    path.write_bytes(b"the previous checkpoint")

    def partial_save(state, file):
        Path(file).write_bytes(b"half a checkp")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, step=1, config=unet_config(tmp_path, tmp_path), model={}, optimizer={},
                        scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None)
    assert path.read_bytes() == b"the previous checkpoint" and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


# ------------------------------------------------------------------------------------------- fine-tuning


def _image_folder(root: Path, count: int = 4) -> Path:
    """``count`` 64×64 PNGs of the shapes domain and their captions.jsonl."""
    root.mkdir()
    shapes = ShapesDataset(count, image_size=64, seed=7)
    with (root / "captions.jsonl").open("w") as captions:
        for index in range(count):
            image, caption = shapes[index]  # (3,64,64) in [-1,1]
            pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"{index}.png")
            captions.write(json.dumps({"file": f"{index}.png", "caption": caption}) + "\n")
    return root


@pytest.mark.parametrize("variant", ["base", "inpainting"])
def test_the_bundled_model_fine_tunes_with_the_shipped_config(tmp_path, monkeypatch, variant):
    """``kandinsky3 train configs/finetune_tiny.json`` from the repository root, 2 steps on a folder of PNGs: the
    bundled fp16 weights (the inpainting model links its MoVQ and T5 files to the base) are read as fp32 starting
    points, the U-Net moves a little from them, the frozen T5 stays exactly, and the export loads as a pipeline."""
    from kandinsky3.pipelines.load import load_pipeline

    _silent_logging(monkeypatch)
    monkeypatch.chdir(REPO)
    model, out = TINY / variant, tmp_path / "run"
    overrides = [f"run.out_dir={out}", f"data.data_root={_image_folder(tmp_path / 'images')}", "run.device=cpu",
                 "run.num_threads=0", "run.sample_interval=0", "schedule.max_steps=2", "schedule.batch_size=2"]
    if variant == "inpainting":
        overrides += ["model.mode=inpainting", "model.unet.num_channels=9", f"model.init_unet={model}",
                      f"model.movq_path={model}", f"text.encoder_path={model}"]
    assert main(["configs/finetune_tiny.json", *overrides]) == 0
    exported, bundled = load_components(out / "final"), load_components(model, dtype="fp32")
    assert exported.variant == variant and exported.sampling_defaults.width == 128
    moved = max((a - b).abs().max().item() for a, b in zip(exported.unet.state_dict().values(),
                                                          bundled.unet.state_dict().values()))
    assert 0 < moved < 1e-2, moved
    t5, t5_bundled = exported.text_encoder.t5.state_dict(), bundled.text_encoder.t5.state_dict()
    assert all(torch.equal(t5[key].float(), t5_bundled[key]) for key in t5_bundled)
    pipe = load_pipeline("text-to-image" if variant == "base" else "inpainting", out / "final")
    assert pipe.unet.config == bundled.unet.config


def test_a_cache_file_is_written_into_new_folders_whole_and_reused_only_for_its_key(tmp_path):
    """The inpainting stage names the base run's latent cache; a folder that does not exist yet is created (it used
    to fail after encoding every image), and no temporary file is left beside the cache."""
    path = tmp_path / "runs" / "not_yet" / "latent_cache.pt"
    computed = []

    def compute():
        computed.append(len(computed))
        return {"latents": torch.full((2, 4, 1, 1), float(len(computed)))}

    first = cached_file(path, {"movq": "a"}, compute, is_main=True)
    again = cached_file(path, {"movq": "a"}, compute, is_main=True)
    other = cached_file(path, {"movq": "b"}, compute, is_main=True)
    assert computed == [0, 1]
    assert torch.equal(first["latents"], again["latents"]) and first["key"] == {"movq": "a"}
    assert other["key"] == {"movq": "b"} and not torch.equal(other["latents"], first["latents"])
    assert [p.name for p in path.parent.iterdir()] == ["latent_cache.pt"]
