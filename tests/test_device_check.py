"""benchmarks/device_check.py --tiny: the GPU check's table, on the CPU with tiny random original-layout weights.

The script writes the weights, builds our pipelines and diffusers' from the same files and times each row; a row
that fails prints "FAILED" instead of numbers, so these tests fail when any row breaks.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.py"
TASKS = [("text-to-image", "fp16"), ("text-to-image", "bf16"), ("inpainting", "fp16")]


def parse(stdout: str) -> dict[tuple[str, str, str], list[str]]:
    """The table's rows: {(task, dtype, impl): [load, s/step, total, peak, note]}."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "task":
            rows[tuple(cells[:3])] = cells[3:]
    return rows


def run_tiny(tmp_path: Path) -> tuple[str, dict[tuple[str, str, str], list[str]]]:
    """Run the script with --tiny in its own process; (its stdout, its rows)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, parse(done.stdout)


def assert_timed(cells: list[str], key) -> None:
    load, step, total, peak, note = cells
    assert "FAILED" not in note, (key, note)
    for value in (load, step, total):
        assert math.isfinite(float(value)) and float(value) > 0, (key, cells)
    assert float(step) < float(total), (key, cells)  # one step is part of the timed call
    assert peak == "-", (key, cells)  # no CUDA peak on the CPU


@pytest.mark.slow  # the whole benchmark script end to end in a subprocess: CI's second tier
def test_tiny_run_times_every_row_for_ours_and_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    stdout, rows = run_tiny(tmp_path)
    assert "GPU: none (CPU run)" in stdout and "torch " in stdout
    expected = {(task, dtype, impl) for task, dtype in TASKS for impl in ("ours", "diffusers")}
    assert set(rows) == expected, stdout
    for key, cells in rows.items():
        assert_timed(cells, key)
    assert "img2img" in rows[("inpainting", "fp16", "diffusers")][-1]
    assert not list(tmp_path.glob("k3-device-check-*")), "the temporary weights folder was left behind"


def test_without_diffusers_its_rows_are_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import device_check

    monkeypatch.setitem(sys.modules, "diffusers", None)  # ``import diffusers`` now raises ImportError
    monkeypatch.setattr(device_check, "ROWS", (("text-to-image", "bf16"),))  # one row is enough here
    device_check.main(["--tiny", "--weights", str(tmp_path / "weights")])
    rows = parse(capsys.readouterr().out)
    assert set(rows) == {("text-to-image", "bf16", "ours"), ("text-to-image", "bf16", "diffusers")}
    assert_timed(rows[("text-to-image", "bf16", "ours")], "ours")
    assert rows[("text-to-image", "bf16", "diffusers")] == ["-", "-", "-", "-", "skipped: diffusers is not installed"]
