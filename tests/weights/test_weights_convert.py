"""The streaming converter (kandinsky3.weights.convert) and the ``kandinsky3 convert`` CLI.

Round trips: original / diffusers checkpoint -> native folder -> load -> the same networks. In fp32 the tensors are
copied unchanged, so outputs agree to 1e-6 (identical in practice); an fp16 conversion must store fp16 tensors
equal to the source cast to fp16 (T5's ``wo`` stays fp32, as transformers keeps it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
from kandinsky3.errors import UsageError
from kandinsky3.weights import convert, load_components, native

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


def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links not followed): file bytes, link targets, folders as ""."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        tree[key] = f"-> {os.readlink(path)}" if path.is_symlink() else path.read_bytes() if path.is_file() else ""
    return tree


def test_converter_refuses_a_non_empty_destination_unless_overwrite(original31, tmp_path):
    dst = convert(original31.root, tmp_path / "model", components=("movq",))
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(original31.root, dst, components=("unet",), **HINTS)
    assert json.loads((dst / "kandinsky3.json").read_text())["components"] == ["movq"]
    convert(original31.root, dst, components=("unet",), overwrite=True, **HINTS)
    assert json.loads((dst / "kandinsky3.json").read_text())["components"] == ["unet"]
    assert sorted(p.name for p in dst.iterdir()) == ["kandinsky3.json", "unet"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left beside it


@pytest.mark.parametrize("where", ["same", "inside", "contains", "link"])
def test_convert_refuses_a_destination_overlapping_the_source_before_writing(tmp_path, where):
    """dst = the source, a folder inside it, a folder containing it, or a link to it: refused (even with
    overwrite) before anything is written, and the source is left byte for byte as it was."""
    src = write_original(tmp_path / "parent" / "k31", "3.1", ("base",)).root
    dst = {"same": src, "inside": src / "native", "contains": src.parent, "link": tmp_path / "link"}[where]
    if where == "link":
        dst.symlink_to(src, target_is_directory=True)
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match="the source"):
        convert(src, dst, overwrite=True, **HINTS)
    assert _tree(tmp_path) == before


def test_convert_refuses_a_destination_holding_a_file_the_source_links_to(tmp_path):
    """A native source whose movq/ links into another model folder: that folder may not be the destination."""
    base = convert(write_original(tmp_path / "k31", "3.1", ("base",)).root, tmp_path / "base", **HINTS)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "movq").symlink_to(base / "movq", target_is_directory=True)
    manifest = {**json.loads((base / "kandinsky3.json").read_text()), "components": ["movq"]}
    (linked / "kandinsky3.json").write_text(json.dumps(manifest))
    before = _tree(base)
    with pytest.raises(UsageError, match=r"contains the source .*movq"):
        convert(linked, base, components=("movq",), overwrite=True)
    assert _tree(base) == before


def test_cli_convert_onto_its_source_is_one_line_and_status_2(tmp_path, capsys):
    src = write_original(tmp_path / "k31", "3.1", ("base",)).root
    before = _tree(src)
    assert main(["convert", str(src), str(src), "--overwrite", "--head-dim", "4", "--groups", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is the source" in err and len(err.splitlines()) == 1
    assert _tree(src) == before


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_conversion_leaves_nothing_and_the_rerun_needs_no_overwrite(original31, tmp_path, monkeypatch,
                                                                             failure):
    """The T5 copy is written last: failing there (after unet/ and movq/ were written) leaves no destination and
    no staging folder, so the same command then succeeds without --overwrite."""
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(native, "write_t5", fail)
    with pytest.raises(type(failure)):
        convert(original31.root, tmp_path / "model", **HINTS)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    dst = convert(original31.root, tmp_path / "model", **HINTS)
    assert json.loads((dst / "kandinsky3.json").read_text())["components"] == ["unet", "movq", "text_encoder"]


def test_a_failed_overwrite_keeps_the_previous_model(original31, tmp_path, monkeypatch):
    dst = convert(original31.root, tmp_path / "model", **HINTS)
    before = _tree(dst)
    monkeypatch.setattr(native, "write_t5", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        convert(original31.root, dst, dtype="fp16", overwrite=True, **HINTS)
    assert _tree(dst) == before and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_overwrite_never_deletes_files_kandinsky3_did_not_write(original31, tmp_path):
    """--overwrite replaces a model folder, but one that also holds the user's files is refused, naming them."""
    dst = convert(original31.root, tmp_path / "model", components=("movq",))
    (dst / "notes.txt").write_text("mine")
    (dst / "photos").mkdir()
    (dst / "photos" / "a.png").write_bytes(b"png")
    (dst / "movq" / "extra.bin").write_bytes(b"x")
    before = _tree(dst)
    with pytest.raises(UsageError, match=r"did not write \(movq/extra\.bin, notes\.txt, photos/\)"):
        convert(original31.root, dst, components=("movq",), overwrite=True)
    assert _tree(dst) == before
    plain = tmp_path / "plain.txt"
    plain.write_text("a file")
    with pytest.raises(UsageError, match="is a file"):
        convert(original31.root, plain, components=("movq",), overwrite=True)
    assert plain.read_text() == "a file"


def test_overwrite_replaces_a_partial_model_folder_of_an_older_version(original31, tmp_path):
    """A folder holding only files a model folder has (e.g. unet/ without a manifest) is kandinsky3's to replace."""
    dst = tmp_path / "model"
    (dst / "unet").mkdir(parents=True)
    (dst / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(original31.root, dst, components=("movq",))
    convert(original31.root, dst, components=("movq",), overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["kandinsky3.json", "movq"]


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
