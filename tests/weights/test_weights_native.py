"""The native layout's one writer (``write_native``) and reader, the sampling defaults a model carries, loading
every component from a checkpoint opened once, and the names shared by the whole package (components, dtypes).

Written folders hold exactly the tensors given, so round trips compare with ``torch.equal`` or the 1e-6 helpers of
_checkpoints (identical in practice).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _checkpoints import (
    TINY_UNET,
    assert_movq_matches,
    assert_text_matches,
    assert_unet_matches,
    make_movq,
    make_text_encoder,
    make_unet,
    write_diffusers,
    write_native,
    write_original,
)

import kandinsky3
from kandinsky3.components import COMPONENTS, SamplingDefaults, parse_dtype
from kandinsky3.errors import UsageError
from kandinsky3.models.unet import UNetConfig
from kandinsky3.weights import (
    CheckpointError,
    convert,
    load_components,
    load_movq,
    load_text_encoder,
    load_unet,
    loading,
    open_checkpoint,
    write_native as write_native_folder,
)
from kandinsky3.weights import native as native_layout
from kandinsky3.weights.native import DestinationError, check_destination

TINY_MODEL = Path(kandinsky3.__file__).resolve().parent / "assets" / "tiny"
HINTS = dict(head_dim=4, groups=4)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return write_native(tmp_path_factory.mktemp("native") / "model", seed=3)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- shared names


def test_parse_dtype_accepts_short_and_long_names_in_any_case():
    assert parse_dtype(None) is None and parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype("fp64") is torch.float64


@pytest.mark.parametrize("value", ["fp8", "int8", torch.int8, 3])
def test_parse_dtype_rejects_what_is_not_a_floating_dtype(value):
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype(value)


def test_components_are_named_in_one_order_everywhere(native):
    assert COMPONENTS == ("unet", "movq", "text_encoder")
    assert json.loads((native.root / "kandinsky3.json").read_text())["components"] == list(COMPONENTS)


def test_sampling_defaults_round_trip_and_reject_bad_values():
    full = SamplingDefaults(64, 48, guidance_scale=3.0, steps=50, sampler="original")
    assert SamplingDefaults.from_dict(full.to_dict()) == full
    assert SamplingDefaults(32, 32).to_dict() == {"width": 32, "height": 32}
    with pytest.raises(ValueError, match=r"unknown keys \['cfg'\], missing keys \['height'\]"):
        SamplingDefaults.from_dict({"width": 64, "cfg": 3})
    for bad in (dict(width=0), dict(steps=2.5), dict(guidance_scale=-1.0), dict(sampler="")):
        with pytest.raises(ValueError):
            SamplingDefaults(**bad)


# ------------------------------------------------------------------------------------------- sampling defaults


def test_bundled_tiny_models_record_their_128px_training_size():
    base, inpainting = open_checkpoint(TINY_MODEL / "base"), open_checkpoint(TINY_MODEL / "inpainting")
    assert base.sampling_defaults == SamplingDefaults(128, 128, guidance_scale=1.5, steps=50, sampler="original")
    assert inpainting.sampling_defaults == SamplingDefaults(128, 128, guidance_scale=1.5, steps=50,
                                                            sampler="original")
    assert load_components(TINY_MODEL / "base", components=("movq",)).sampling_defaults == base.sampling_defaults


def test_released_layouts_and_older_native_folders_default_to_1024(tmp_path, native):
    original = write_original(tmp_path / "k31")
    assert open_checkpoint(original.root).sampling_defaults == SamplingDefaults(1024, 1024)
    diffusers = write_diffusers(tmp_path / "diffusers")
    assert load_components(diffusers.root, components=("movq",)).sampling_defaults == SamplingDefaults(1024, 1024)
    assert open_checkpoint(native.root).sampling_defaults == SamplingDefaults(1024, 1024)  # written without any
    manifest = json.loads((native.root / "kandinsky3.json").read_text())
    older = tmp_path / "older"
    older.mkdir()
    del manifest["sampling_defaults"]
    (older / "kandinsky3.json").write_text(json.dumps(manifest))
    assert open_checkpoint(older).sampling_defaults == SamplingDefaults(1024, 1024)


def test_a_bad_sampling_defaults_entry_names_the_manifest(tmp_path, native):
    manifest = json.loads((native.root / "kandinsky3.json").read_text())
    manifest["sampling_defaults"] = {"width": 64}
    (tmp_path / "kandinsky3.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"kandinsky3\.json: .*missing keys \['height'\]"):
        open_checkpoint(tmp_path)


def test_native_to_native_conversion_keeps_sampling_defaults_and_tensors(tmp_path):
    dst = convert(TINY_MODEL / "inpainting", tmp_path / "copy")
    assert open_checkpoint(dst).sampling_defaults == open_checkpoint(TINY_MODEL / "inpainting").sampling_defaults
    copied, source = load_components(dst), load_components(TINY_MODEL / "inpainting")
    assert copied.variant == "inpainting" and copied.conditioning == "original"
    for name in COMPONENTS:
        state, reference = getattr(copied, name).state_dict(), getattr(source, name).state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def test_a_movq_only_folder_converts_without_naming_its_components(tmp_path):
    """A MoVQ run's final/ holds only movq/: converting it (e.g. to fp16, as the bundled model ships) needs no
    --components; the copy holds the same MoVQ and nothing else."""
    source = write_native_folder(tmp_path / "run_final", movq=make_movq(seed=2))
    dst = convert(source, tmp_path / "fp16", dtype="fp16")
    assert open_checkpoint(dst).manifest["components"] == ["movq"]
    copied, reference = load_movq(dst).state_dict(), load_movq(source).state_dict()
    assert copied.keys() == reference.keys()
    assert all(torch.equal(copied[k], reference[k].half().float()) for k in copied)


# ------------------------------------------------------------------------------------------- writer


def test_networks_and_state_dict_pairs_write_the_same_files(tmp_path):
    """A trainer under FSDP hands gathered state dicts with the config (U-Net, MoVQ) or the module (text encoder)."""
    unet, movq, text = make_unet(seed=1), make_movq(seed=2), make_text_encoder(seed=3)
    defaults = SamplingDefaults(64, 64, guidance_scale=3.0)
    common = dict(variant="base", sampling_defaults=defaults, source="a test")
    modules = write_native_folder(tmp_path / "modules", unet=unet, movq=movq, text_encoder=text, **common)
    pairs = write_native_folder(
        tmp_path / "pairs", unet=(unet.config, unet.state_dict()), movq=(movq, movq.state_dict()),
        text_encoder=(text, text.state_dict()), **common,
    )
    assert _files(modules) == _files(pairs)
    manifest = json.loads((modules / "kandinsky3.json").read_text())
    assert manifest["sampling_defaults"] == {"width": 64, "height": 64, "guidance_scale": 3.0}
    loaded = load_components(pairs)
    assert_unet_matches(loaded.unet, unet)
    assert_movq_matches(loaded.movq, movq)
    assert_text_matches(loaded.text_encoder, text)


def test_a_movq_alone_is_a_model_folder_the_loaders_read(tmp_path):
    movq = make_movq(seed=4)
    folder = write_native_folder(tmp_path / "movq_run", movq=movq)
    assert json.loads((folder / "kandinsky3.json").read_text())["components"] == ["movq"]
    assert_movq_matches(load_movq(folder), movq)
    with pytest.raises(CheckpointError, match=r"has no unet \(it has \['movq'\]\)"):
        load_unet(folder)


def test_components_are_copied_from_an_opened_checkpoint(tmp_path):
    """The inpainting trainer's export: its own U-Net, the base model's T5 and MoVQ."""
    base = open_checkpoint(TINY_MODEL / "base")
    unet = make_unet(UNetConfig(**{**TINY_UNET.to_dict(), "num_channels": 9}), seed=5)
    folder = write_native_folder(tmp_path / "inpainting", unet=unet, movq=base, text_encoder=base,
                                 variant="inpainting")
    assert torch.equal(load_movq(folder).decoder.conv_out.weight, load_movq(base).decoder.conv_out.weight)
    assert_text_matches(load_text_encoder(folder), load_text_encoder(base), tolerance=0.0)
    assert_unet_matches(load_unet(folder, variant="inpainting"), unet)


def test_copied_text_encoder_must_match_the_requested_conditioning(tmp_path):
    diffusers = open_checkpoint(write_diffusers(tmp_path / "diffusers").root)
    with pytest.raises(ValueError, match="has 'diffusers' conditioning"):
        write_native_folder(tmp_path / "out", text_encoder=diffusers, conditioning="original")
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_the_destination_as_it_was(tmp_path):
    target = write_native_folder(tmp_path / "model", movq=make_movq(seed=1))
    before = _files(target)
    state = make_unet().state_dict()
    del state["out_layer.2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \[out_layer\.2\.bias\]"):
        write_native_folder(target, movq=make_movq(), unet=(TINY_UNET, state), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and _files(target) == before
    with pytest.raises(FileExistsError, match="overwrite"):
        write_native_folder(target, movq=make_movq())
    with pytest.raises(ValueError, match="bad conditioning"):
        write_native_folder(tmp_path / "new", movq=make_movq(), conditioning="sd")
    assert not (tmp_path / "new").exists()


def test_staging_folders_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    """A write killed before it could clean up (SIGKILL) leaves ``.NAME.partial-PID-*``; the next write to NAME
    removes it once that process has ended, and keeps a live process's folder and anything else."""
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)  # a process that has exited
    stale = tmp_path / f".model.partial-{dead_pid}-0123abcd"
    live = tmp_path / f".model.partial-{os.getpid()}-feedbeef"  # a write in progress (this process)
    other = tmp_path / f".other.partial-{dead_pid}-0123abcd"  # another destination's
    for folder in (stale, live, other):
        (folder / "movq").mkdir(parents=True)
        (folder / "movq" / "model.safetensors").write_bytes(b"half")
    write_native_folder(tmp_path / "model", movq=make_movq(seed=1))
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "model"])


def test_every_file_the_writer_writes_is_its_own_to_replace(native, tmp_path):
    """Whatever write_native writes (a tokenizer saved by transformers or copied from a hub-style folder, a
    movq-only folder) and the bundled models (inpainting links its MoVQ and T5 files to the base) may be replaced
    with overwrite; the links are replaced, never what they point to."""
    copied = convert(write_original(tmp_path / "k31").root, tmp_path / "copied", **HINTS)  # spiece.model copied
    movq_only = write_native_folder(tmp_path / "movq_only", movq=make_movq())
    for folder in (native.root, copied, movq_only, TINY_MODEL / "base", TINY_MODEL / "inpainting"):
        check_destination(folder, overwrite=True)
    bundled = tmp_path / "bundled"
    shutil.copytree(TINY_MODEL, bundled, symlinks=True)
    base_files = _files(bundled / "base")
    write_native_folder(bundled / "inpainting", movq=make_movq(), overwrite=True)
    assert not (bundled / "inpainting" / "movq").is_symlink() and _files(bundled / "base") == base_files


def test_files_that_appear_in_the_destination_during_a_write_are_kept(tmp_path, monkeypatch):
    """The destination is checked again just before it is replaced: a file the user put there meanwhile stops
    the swap, and the staging folder is removed."""
    target = write_native_folder(tmp_path / "model", movq=make_movq(seed=1))
    write_t5 = native_layout.write_t5

    def write_t5_meanwhile(*args, **kwargs):
        (target / "notes.txt").write_text("mine")
        return write_t5(*args, **kwargs)

    monkeypatch.setattr(native_layout, "write_t5", write_t5_meanwhile)
    with pytest.raises(DestinationError, match=r"did not write \(notes\.txt\)"):
        write_native_folder(target, movq=make_movq(), text_encoder=make_text_encoder(), overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["kandinsky3.json", "movq", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_destination_errors_are_usage_errors_and_file_exists_errors(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.txt").write_text("x")
    with pytest.raises(DestinationError) as info:
        write_native_folder(tmp_path / "model", movq=make_movq(), overwrite=True)
    assert isinstance(info.value, UsageError) and isinstance(info.value, FileExistsError)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "model", target_is_directory=True)
    with pytest.raises(DestinationError, match="is a link"):
        write_native_folder(link, movq=make_movq(), overwrite=True)


def test_a_streamed_text_encoder_is_refused_with_the_fix(native, tmp_path):
    streamed = load_text_encoder(native.root, stream_t5=True)
    with pytest.raises(ValueError, match="holds no weights to save"):
        write_native_folder(tmp_path / "out", text_encoder=streamed)


# ------------------------------------------------------------------------------------------- opened once


def test_loading_detects_the_layout_once_and_reuses_an_opened_checkpoint(native, monkeypatch):
    calls = []
    real = loading.open_checkpoint

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "open_checkpoint", counting)
    load_components(native.root)
    assert len(calls) == 1
    checkpoint = real(native.root)
    monkeypatch.setattr(loading, "open_checkpoint", None)  # an opened checkpoint must not be opened again
    loaded = load_components(checkpoint, components=("unet", "text_encoder"))
    assert_unet_matches(loaded.unet, native.unets["base"])
    assert_unet_matches(load_unet(checkpoint), native.unets["base"])
    assert_movq_matches(load_movq(checkpoint), native.movq)
    assert_text_matches(load_text_encoder(checkpoint), native.texts["base"])


def test_an_opened_checkpoint_refuses_another_variant(tmp_path):
    written = write_original(tmp_path / "k31", variants=("base", "flash"))
    flash = open_checkpoint(written.root, variant="flash")
    assert_unet_matches(load_unet(flash, **HINTS), written.unets["flash"])
    with pytest.raises(CheckpointError, match="opened for variant 'flash', but 'base' was requested"):
        load_unet(flash, variant="base", **HINTS)


def test_a_native_text_encoder_folder_loads_alone(native):
    assert_text_matches(load_text_encoder(native.root / "text_encoder"), native.texts["base"])
