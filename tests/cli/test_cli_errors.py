"""How ``kandinsky3`` fails: one line and status 2 for the user's mistakes, one line naming a log file and status 1
for anything else, the traceback only with -v/--debug, status 130 and no traceback on Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import kandinsky3
from kandinsky3 import cli
from kandinsky3.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_BASE = Path(kandinsky3.__file__).resolve().parent / "assets" / "tiny" / "base"


def _bug(args):
    raise TypeError("unsupported operand type(s)")


def _mistake(args):
    raise UsageError("width=18 is not a multiple of 64")


def test_a_bug_is_one_line_naming_a_log_file_that_holds_the_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(cli, "run_generate", _bug)
    assert cli.main(["generate", "a"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("kandinsky3 generate: failed: TypeError: unsupported operand type(s)")
    (log,) = tmp_path.glob("kandinsky3-generate-*.log")
    assert str(log) in err
    text = log.read_text()
    assert "kandinsky3 generate a" in text and "Traceback" in text and "in _bug" in text


@pytest.mark.parametrize("flags", [("-v", "generate", "a"), ("generate", "a", "--debug"), ("--debug", "generate", "a")])
def test_verbose_or_debug_prints_the_traceback(monkeypatch, capsys, flags):
    monkeypatch.setattr(cli, "run_generate", _bug)
    assert cli.main(list(flags)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in _bug" in err


def test_a_usage_mistake_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_generate", _mistake)
    assert cli.main(["generate", "a"]) == 2
    assert capsys.readouterr().err.strip() == "kandinsky3 generate: error: width=18 is not a multiple of 64"


@pytest.mark.parametrize("args, message", [
    (("--model", "/no/such/folder"), "no such checkpoint"),
    (("--width", "18", "--height", "16"), "not a multiple of 4"),
])
def test_user_mistakes_give_one_clear_line_and_status_2(cli, model, tmp_path, args, message):
    if "--model" not in args:
        args = (*args, "--model", model)
    result = cli("generate", "a", *args, "-o", str(tmp_path / "out.png"), "--no-progress")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("device, message", [
    ("tpu", "device 'tpu' is not a device"),
    ("cuda:0", "no usable CUDA device"),
    ("cuda", "no usable CUDA device"),
])
def test_unusable_devices_are_one_line_and_status_2(main, tmp_path, device, message):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, _, err = main("generate", "a red circle", "--model", "tiny", "--device", device, "-o",
                          str(tmp_path / "x.png"))
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _folder_dataset(root: Path, captions: str) -> Path:
    root.mkdir()
    (root / "captions.jsonl").write_text(captions, encoding="utf-8")
    return root


def _train_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (train arguments, what the error line says)."""
    unet = str(CONFIGS / "smoke_unet.json")
    out = f"run.out_dir={tmp / 'run'}"
    bad_json = tmp / "bad.json"
    bad_json.write_text('{"trainer": "unet",', encoding="utf-8")
    missing = _folder_dataset(tmp / "missing", '{"file": "gone.png", "caption": "a red circle"}\n')
    broken = _folder_dataset(tmp / "broken", '{"file": "a.png", "caption": \n')
    folder = ["data.dataset=folder", f"model.movq_path={TINY_BASE}"]
    return {
        "missing MoVQ files": ([unet, out, f"model.movq_path={tmp / 'no-movq'}"], "no-movq"),
        "unknown config key": ([unet, out, "run.colour=1"], "unknown keys ['run.colour']"),
        "max_steps=0": ([unet, out, "schedule.max_steps=0"], "max_steps must be >= 1"),
        "missing config file": ([str(tmp / "nothing.json"), out], "nothing.json"),
        "bad JSON config": ([str(bad_json), out], "Expecting"),
        "missing image": ([unet, out, *folder, f"data.data_root={missing}"], "gone.png"),
        "bad JSON captions": ([unet, out, *folder, f"data.data_root={broken}"], "Expecting value"),
    }


@pytest.mark.parametrize("case", ["missing MoVQ files", "unknown config key", "max_steps=0", "missing config file",
                                  "bad JSON config", "missing image", "bad JSON captions"])
def test_every_train_mistake_is_one_line_and_status_2(cli, tmp_path, case):
    args, message = _train_cases(tmp_path)[case]
    result = cli("train", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and lines[-1].startswith("kandinsky3 train: error:"), result.stderr
    assert message in lines[-1] and sum("error" in line for line in lines) == 1


def _interrupt_when(args: list[str], marker: str, cwd: Path) -> tuple[int, str, str]:
    """Start ``kandinsky3 ARGS``, send SIGINT (Ctrl-C) once ``marker`` appears in its output, return (status,
    stdout, stderr). SIGINT's default handler is restored in the child: a background parent may have ignored it."""
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "kandinsky3.cli", *args], stdout=stdout, stderr=stderr,
                                   env=env, cwd=cwd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 240
        while marker not in out.read_text() + err.read_text():
            assert process.poll() is None, f"ended before {marker!r}: {err.read_text()}"
            assert time.monotonic() < deadline, f"no {marker!r} in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=120)
    return status, out.read_text(), err.read_text()


def test_ctrl_c_in_generate_is_one_line_status_130_and_leaves_only_whole_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n" * 200, encoding="utf-8")
    status, out, err = _interrupt_when(["generate", "--prompts", str(prompts), "--model", "tiny", "--steps", "20",
                                        "-o", str(tmp_path / "out.png"), "--no-progress"], "wrote", tmp_path)
    assert status == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("kandinsky3 generate: interrupted")
    written = sorted(tmp_path.glob("out_*.png"))
    assert 1 <= len(written) < 200 and len(written) == out.count("wrote")
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written temporary left


def test_ctrl_c_in_train_says_how_to_resume(tmp_path):
    args = ["train", str(CONFIGS / "smoke_movq.json"), f"run.out_dir={tmp_path / 'run'}", "schedule.max_steps=100000"]
    status, out, err = _interrupt_when(args, "step 2 ", tmp_path)
    assert status == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("kandinsky3 train: interrupted; run the same command with --resume")
