"""Hub repo ids (kandinsky3.weights.hub), tested offline only: nothing here may reach the network.

Every test runs with ``HF_HUB_OFFLINE=1`` and a fresh ``HF_HOME``. A "warm cache" is simulated by writing a
snapshot folder in huggingface_hub's cache layout (``models--owner--name/refs/main`` + ``snapshots/<commit>/``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from _checkpoints import assert_unet_matches, write_original

from kandinsky3 import get_T2I_pipeline
from kandinsky3.weights import (
    HubError,
    convert,
    load_components,
    load_movq,
    load_text_encoder,
    load_unet,
    open_checkpoint,
)
from kandinsky3.weights.hub import file_patterns, is_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAIL_FAST_SECONDS = 10


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def _snapshot(home: Path, repo_id: str) -> Path:
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def test_repo_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    assert is_repo_id("ai-forever/Kandinsky3.1") and is_repo_id("someone/some-model_2")
    assert not is_repo_id("weights/kandinsky3.pt/extra") and not is_repo_id("model.pt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ai-forever" / "Kandinsky3.1").mkdir(parents=True)
    assert not is_repo_id("ai-forever/Kandinsky3.1")  # an existing local folder wins


def test_file_patterns_select_only_what_a_variant_needs():
    flash = file_patterns("original-3.1", ("unet", "text_encoder"), "flash")
    assert "weights/kandinsky3_flash.pt" in flash and "weights/flan_ul2_encoder/projection_flash.pt" in flash
    assert "weights/kandinsky3.pt" not in flash and "weights/movq.pt" not in flash
    assert file_patterns("original-3.0", ("unet",), "inpainting") == ["weights/kandinsky3_inpainting.pt"]
    with pytest.raises(ValueError, match="no flash variant"):
        file_patterns("original-3.0", ("unet",), "flash")
    diffusers = file_patterns("diffusers-fp16", ("text_encoder",), None)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in diffusers  # the projection lives in the U-Net
    assert "text_encoder/model.safetensors.index.fp16.json" in diffusers and "movq/config.json" not in diffusers


@pytest.mark.parametrize(
    "repo_id, loader, expected",
    [
        ("ai-forever/Kandinsky3.1", load_unet, "weights/kandinsky3.pt"),
        ("ai-forever/Kandinsky3.0", load_movq, "weights/movq.pt"),
        ("kandinsky-community/kandinsky-3", load_unet, "unet/diffusion_pytorch_model.fp16.safetensors"),
        ("someone/unknown-model", load_unet, "*"),
    ],
)
def test_offline_without_cache_fails_fast_listing_files_and_the_fix(offline, repo_id, loader, expected):
    start = time.perf_counter()
    with pytest.raises(HubError) as info:
        loader(repo_id)
    assert time.perf_counter() - start < FAIL_FAST_SECONDS
    message = str(info.value)
    assert repo_id in message and expected in message
    assert "HF_HUB_OFFLINE" in message and f"hf download {repo_id}" in message and "pass DIR as the path" in message


WHOLE_31 = [
    "weights/kandinsky3.pt", "weights/movq.pt", "weights/flan_ul2_encoder/config.json",
    "weights/flan_ul2_encoder/pytorch_model.bin.index.json", "weights/flan_ul2_encoder/pytorch_model-*.bin",
    "weights/flan_ul2_encoder/projection.pt",
]


WHOLE_MODEL_CALLS = {  # each needs every component of the repo
    "open_checkpoint": lambda repo, tmp: open_checkpoint(repo),
    "load_components": lambda repo, tmp: load_components(repo),
    "convert": lambda repo, tmp: convert(repo, tmp / "out"),
    "get_T2I_pipeline": lambda repo, tmp: get_T2I_pipeline("cpu", model=repo),
}


@pytest.mark.parametrize("name", sorted(WHOLE_MODEL_CALLS))
def test_offline_whole_model_call_lists_every_file_it_needs_in_one_error(offline, tmp_path, name):
    with pytest.raises(HubError) as info:
        WHOLE_MODEL_CALLS[name]("ai-forever/Kandinsky3.1", tmp_path)
    assert sorted(info.value.files) == sorted(WHOLE_31)


def test_offline_text_encoder_of_the_diffusers_repo_lists_its_fp16_shards(offline):
    with pytest.raises(HubError, match=r"text_encoder/model\.fp16-\*\.safetensors"):
        load_text_encoder("kandinsky-community/kandinsky-3")


def test_warm_cache_loads_offline(offline):
    snapshot = _snapshot(offline, "ai-forever/Kandinsky3.1")
    written = write_original(snapshot, "3.1", ("base",))
    unet = load_unet("ai-forever/Kandinsky3.1", head_dim=4, groups=4)
    assert_unet_matches(unet, written.unets["base"])
    loaded = load_components("ai-forever/Kandinsky3.1", head_dim=4, groups=4, components=("movq", "text_encoder"))
    assert loaded.generation == "3.1" and loaded.text_encoder is not None


def test_partially_cached_repo_names_the_missing_files(offline):
    snapshot = _snapshot(offline, "ai-forever/Kandinsky3.1")
    written = write_original(snapshot, "3.1", ("base",))
    shutil.rmtree(written.root / "weights" / "flan_ul2_encoder")
    with pytest.raises(HubError) as info:
        load_text_encoder("ai-forever/Kandinsky3.1")
    message = str(info.value)
    assert "weights/flan_ul2_encoder/projection.pt" in message and "weights/flan_ul2_encoder/config.json" in message
    assert "weights/kandinsky3.pt" not in message.split("(")[0]  # present files are not listed as missing


def test_30_text_encoder_without_t5_path_needs_flan_ul2_from_the_hub(offline, tmp_path):
    written = write_original(tmp_path / "k30", "3.0", ("base",))
    with pytest.raises(HubError, match="google/flan-ul2"):
        load_text_encoder(written.root)
