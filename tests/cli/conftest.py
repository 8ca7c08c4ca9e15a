"""Fixtures of the ``kandinsky3`` command's tests: the command run as a real subprocess, a tiny native checkpoint."""

import os
import subprocess
import sys

import pytest
from _checkpoints import write_native

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(*args: str, env: dict | None = None, cwd=None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kandinsky3.cli", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, input=stdin, timeout=300)


@pytest.fixture
def cli():
    """``cli(*args, env=None, cwd=None, stdin=None)``: run ``kandinsky3 ARGS`` (offline, one thread)."""
    return _run


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny random native checkpoint (image sides: multiples of 4)."""
    return str(write_native(tmp_path_factory.mktemp("native") / "model").root)


@pytest.fixture(scope="session")
def flash_model(tmp_path_factory):
    """A tiny random native checkpoint of the Flash variant (4 fixed steps, no guidance)."""
    from _checkpoints import make_movq, make_text_encoder, make_unet

    from kandinsky3 import weights

    root = tmp_path_factory.mktemp("flash") / "model"
    weights.write_native(root, unet=make_unet(seed=10), movq=make_movq(seed=0),
                         text_encoder=make_text_encoder(seed=20, t5_seed=0), variant="flash")
    return str(root)


@pytest.fixture
def main(monkeypatch, capsys):
    """``main(*args, cwd=None) -> (status, stdout, stderr)``: ``kandinsky3 ARGS`` in this process, where loading a
    model fails the test (so a refusal it returns was decided before loading); the thread count is left alone."""
    from kandinsky3 import cli, command, pipelines

    def load_pipeline(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(command, "set_threads", lambda: None)
    monkeypatch.setattr(pipelines, "load_pipeline", load_pipeline)

    def run(*args: str, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        status = cli.main(list(args))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run
