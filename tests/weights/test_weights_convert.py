"""The streaming converter (kandinsky3.weights.convert) and the ``kandinsky3 convert`` CLI.

Round trips: original / diffusers checkpoint -> native folder -> load -> the same networks. In fp32 the tensors are
copied unchanged, so outputs agree to 1e-6 (identical in practice); an fp16 conversion must store fp16 tensors
equal to the source cast to fp16 (T5's ``wo`` stays fp32, as transformers keeps it).
"""

from __future__ import annotations

import json

import pytest
import torch
from _checkpoints import (
    assert_movq_matches,
    assert_text_matches,
    assert_unet_matches,
    write_diffusers,
    write_original,
)
from safetensors import safe_open

from kandinsky3.cli import main
from kandinsky3.weights import convert, load_components

HINTS = dict(head_dim=4, groups=4)


@pytest.fixture(scope="module")
def original31(tmp_path_factory):
    return write_original(tmp_path_factory.mktemp("k31"), "3.1", ("base", "flash"))


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return write_diffusers(tmp_path_factory.mktemp("diffusers"))


def _dtypes(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_slice(key).get_dtype() for key in handle.keys()}


def test_original_to_native_round_trip_keeps_every_output(original31, tmp_path):
    dst = convert(original31.root, tmp_path / "native", variant="flash", **HINTS)
    manifest = json.loads((dst / "kandinsky3.json").read_text())
    assert manifest["variant"] == "flash" and manifest["conditioning"] == "original"
    assert manifest["source"] == "converted from original 3.1"
    loaded = load_components(dst)
    assert loaded.layout == "native" and loaded.variant == "flash"
    assert_unet_matches(loaded.unet, original31.unets["flash"])
    assert_movq_matches(loaded.movq, original31.movq)
    assert_text_matches(loaded.text_encoder, original31.texts["flash"])


def test_fp16_conversion_stores_fp16_tensors_except_t5_wo(original31, tmp_path):
    dst = convert(original31.root, tmp_path / "fp16", dtype="fp16", **HINTS)
    assert set(_dtypes(dst / "unet" / "model.safetensors").values()) == {"F16"}
    assert set(_dtypes(dst / "movq" / "model.safetensors").values()) == {"F16"}
    assert set(_dtypes(dst / "text_encoder" / "conditioning.safetensors").values()) == {"F16"}
    t5 = _dtypes(dst / "text_encoder" / "model.safetensors")
    assert {d for k, d in t5.items() if ".wo." in k} == {"F32"}
    assert {d for k, d in t5.items() if ".wo." not in k} == {"F16"}
    loaded = load_components(dst)
    state = loaded.unet.state_dict()
    reference = original31.unets["base"].state_dict()
    assert all(state[k].dtype == torch.float16 and torch.equal(state[k], v.half()) for k, v in reference.items())
    assert torch.equal(loaded.text_encoder.null_embedding, original31.texts["base"].null_embedding.detach().half())


def test_diffusers_to_native_keeps_diffusers_conditioning_and_scheduler(diffusers_folder, tmp_path):
    dst = convert(diffusers_folder.root, tmp_path / "native")
    direct = load_components(diffusers_folder.root)
    loaded = load_components(dst)
    assert loaded.conditioning == "diffusers" and loaded.scheduler_config == direct.scheduler_config
    assert "null_embedding" not in _dtypes(dst / "text_encoder" / "conditioning.safetensors")
    assert_unet_matches(loaded.unet, direct.unet)
    assert_movq_matches(loaded.movq, direct.movq)
    assert_text_matches(loaded.text_encoder, direct.text_encoder)


def test_original_30_with_full_t5_converts_only_the_encoder(tmp_path):
    written = write_original(tmp_path / "k30", "3.0", ("base",), seed=3)
    dst = convert(written.root, tmp_path / "native", t5_path=written.t5_path, components=("text_encoder",))
    assert not any(key.startswith("decoder.") for key in _dtypes(dst / "text_encoder" / "model.safetensors"))
    loaded = load_components(dst, components=("text_encoder",))
    assert loaded.unet is None and json.loads((dst / "kandinsky3.json").read_text())["components"] == ["text_encoder"]
    assert_text_matches(loaded.text_encoder, written.texts["base"])


def test_converter_refuses_a_non_empty_destination_unless_overwrite(original31, tmp_path):
    dst = tmp_path / "busy"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(original31.root, dst, components=("movq",))
    convert(original31.root, dst, components=("movq",), overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "movq" / "model.safetensors").is_file()


def test_cli_convert_writes_a_native_folder(original31, tmp_path, capsys):
    dst = tmp_path / "cli"
    status = main(["convert", str(original31.root), str(dst), "--variant", "flash", "--dtype", "bf16",
                   "--components", "unet", "--head-dim", "4", "--groups", "4"])
    assert status == 0 and "wrote" in capsys.readouterr().out
    assert set(_dtypes(dst / "unet" / "model.safetensors").values()) == {"BF16"}
    assert main(["convert", str(original31.root), str(dst), "--components", "unet"]) == 2  # dst not empty
    assert "not empty" in capsys.readouterr().err


def test_cli_rejects_an_unknown_dtype():
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--dtype", "fp8"])
