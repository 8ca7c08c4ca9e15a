"""Safe checkpoint reading and the streaming safetensors writer (kandinsky3.weights.safe_io / sources).

Every error case must raise CheckpointError (a ValueError) whose message names the file and the problem.
"""

from __future__ import annotations

import collections
import json
import struct

import pytest
import torch
from _checkpoints import TINY_UNET, make_unet, write_original
from safetensors import safe_open

from kandinsky3.weights import CheckpointError, load_movq, load_unet
from kandinsky3.weights.safe_io import load_torch_file, release_pages, write_safetensors
from kandinsky3.weights.sources import SafetensorsSource

HINTS = dict(head_dim=4, groups=4)  # the tiny U-Net's values (not determined by shapes)


class NotATensor:  # a custom class: torch.load(weights_only=True) must refuse to build it
    pass


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_original(tmp_path_factory.mktemp("original"), "3.1", ("base",))


@pytest.fixture(scope="module")
def unet_state():
    return make_unet(seed=3).state_dict()


# ------------------------------------------------------------------------------------------ streaming writer


def test_streaming_writer_output_reads_back_with_safe_open(tmp_path):
    tensors = {
        "a.weight": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2, 2).half(),
        "steps": torch.arange(4),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "x.safetensors"
    fetched = []

    def fetch(name):
        fetched.append(name)
        return tensors[name]

    write_safetensors(path, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, fetch, {"format": "pt"})
    assert fetched == list(tensors)  # one at a time, in layout order
    with open(path, "rb") as file:
        header_length = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(header_length))
    assert header_length % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(tensors)
        for key, value in tensors.items():
            got = handle.get_tensor(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key
    source = SafetensorsSource(path)  # our positioned-read reader agrees with safe_open
    assert all(torch.equal(source[key], value) for key, value in tensors.items())
    assert not (tmp_path / "x.safetensors.partial").exists()


def test_streaming_writer_rejects_a_tensor_that_differs_from_its_layout(tmp_path):
    with pytest.raises(ValueError, match="layout says"):
        write_safetensors(tmp_path / "x.safetensors", {"a": ((2,), torch.float32)}, lambda name: torch.zeros(3))


def test_release_pages_keeps_memory_mapped_data_intact(original):
    data, mmapped = load_torch_file(original.root / "weights" / "movq.pt")
    assert mmapped
    expected = original.movq.state_dict()
    for key, tensor in data.items():
        release_pages(tensor)
        assert torch.equal(tensor, expected[key]), key  # re-read from the file after the pages were dropped


def test_legacy_non_zip_pickle_is_read_without_mmap(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    data, mmapped = load_torch_file(path)
    assert not mmapped and torch.equal(data["w"], torch.ones(2))


# ------------------------------------------------------------------------------------------ unsafe or broken files


def test_truncated_pt_file_is_a_checkpoint_error_naming_the_file(tmp_path, original):
    blob = (original.root / "weights" / "kandinsky3.pt").read_bytes()
    path = tmp_path / "kandinsky3.pt"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as info:
        load_unet(path, **HINTS)
    assert str(path) in str(info.value)


def test_truncated_safetensors_file_is_a_checkpoint_error(tmp_path, unet_state):
    full = tmp_path / "full.safetensors"
    write_safetensors(full, {k: (tuple(v.shape), v.dtype) for k, v in unet_state.items()}, unet_state.__getitem__)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as info:
        load_unet(cut, **HINTS)
    assert str(cut) in str(info.value)


def test_pickle_with_a_counter_is_refused(tmp_path, unet_state):
    path = tmp_path / "counter.pt"
    torch.save({"unet": unet_state, "null_embedding": torch.zeros(12), "stats": collections.Counter("abc")}, path)
    with pytest.raises(CheckpointError, match=r"entry 'stats' is a collections\.Counter") as info:
        load_unet(path, **HINTS)
    assert str(path) in str(info.value)


def test_pickle_with_a_custom_class_is_not_unpickled(tmp_path, unet_state):
    path = tmp_path / "custom.pt"
    torch.save({"unet": unet_state, "null_embedding": torch.zeros(12), "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="other than tensors and dicts") as info:
        load_unet(path, **HINTS)
    assert str(path) in str(info.value)


def test_flat_movq_file_holding_a_counter_is_refused(tmp_path):
    path = tmp_path / "movq.pt"
    torch.save(collections.Counter("abc"), path)
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_movq(path)


def test_unet_container_without_unet_entry(tmp_path, unet_state):
    path = tmp_path / "nounet.pt"
    torch.save({"model": unet_state, "null_embedding": torch.zeros(12)}, path)
    with pytest.raises(CheckpointError, match="has no 'unet' entry") as info:
        load_unet(path, **HINTS)
    assert str(path) in str(info.value) and "'model'" in str(info.value)


def _save_container(path, state):
    torch.save({"unet": state, "null_embedding": torch.zeros(12)}, path)
    return path


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, unet_state):
    state = dict(unet_state)
    del state["out_layer.0.bias"]
    state["stray.weight"] = torch.zeros(1)
    state["in_layer.bias"] = torch.zeros(9)
    path = _save_container(tmp_path / "bad.pt", state)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, config=TINY_UNET)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "missing keys [out_layer.0.bias]" in message
    assert "unexpected keys [stray.weight]" in message
    assert "in_layer.bias: expected (8,), got (9,)" in message


def test_inferred_config_path_also_reports_wrong_shapes(tmp_path, unet_state):
    state = dict(unet_state, **{"out_layer.0.weight": torch.zeros(5)})
    path = _save_container(tmp_path / "shape.pt", state)
    with pytest.raises(CheckpointError, match=r"out_layer\.0\.weight: expected \(8,\), got \(5,\)"):
        load_unet(path, **HINTS)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        load_unet(tmp_path / "nothing_here.pt")


def test_folder_that_is_no_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="is not a Kandinsky 3 checkpoint"):
        load_unet(tmp_path)
