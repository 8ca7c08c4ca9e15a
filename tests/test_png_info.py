"""Generation parameters in PNG text chunks (AUTOMATIC1111's "parameters" format) and atomic PNG writes."""

import os
import re
import zlib

import numpy as np
import pytest
from PIL import Image

from kandinsky3 import png_info
from kandinsky3.png_info import format_parameters, parse_parameters, png_bytes, read_parameters, save_png

BASE = dict(steps=50, sampler="original", guidance_scale=3.0, seed=1234567, width=64, height=96, model="tiny")


def _image(value: int = 0) -> Image.Image:
    return Image.fromarray(np.full((6, 4, 3), value, np.uint8))


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, read with the PNG layout itself (length, type, data, CRC)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        kind, payload = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        assert int.from_bytes(data[at + 8 + length:at + 12 + length], "big") == zlib.crc32(kind + payload)
        chunks.append((kind, payload))
        at += 12 + length
    return chunks


def test_parameters_text_has_automatic1111s_three_part_shape():
    """Prompt line, "Negative prompt: …" line, then "Key: value" pairs with A1111's key names in its order."""
    text = format_parameters("a red circle", "blurry", **BASE, eta=1.0, denoising_strength=0.3)
    prompt, negative, pairs = text.split("\n")
    assert prompt == "a red circle" and negative == "Negative prompt: blurry"
    assert pairs == ("Steps: 50, Sampler: original, CFG scale: 3.0, Seed: 1234567, Size: 64x96, Model: tiny, "
                     "Eta: 1.0, Denoising strength: 0.3")
    # A1111's parameter line: key (word chars, spaces, - and /), colon, value up to the next comma
    assert all(re.fullmatch(r"\w[\w \-/]*: [^,]*", pair) for pair in pairs.split(", "))
    assert "Negative prompt" not in format_parameters("a red circle", None, **BASE)


def test_parameters_round_trip_through_the_parser():
    text = format_parameters("line one\nline two", "no: commas, please", **{**BASE, "model": "C:\\models\\k3"},
                             note='say "hi"')
    parsed = parse_parameters(text)
    assert parsed == {
        "Prompt": "line one\nline two", "Negative prompt": "no: commas, please", "Steps": "50",
        "Sampler": "original", "CFG scale": "3.0", "Seed": "1234567", "Size": "64x96", "Model": "C:\\models\\k3",
        "Note": 'say "hi"',
    }


def test_text_without_a_parameter_line_is_all_prompt():
    assert parse_parameters("just a prompt, with a comma") == {"Prompt": "just a prompt, with a comma",
                                                                "Negative prompt": ""}


def test_png_carries_the_parameters_in_a_text_chunk_named_parameters():
    latin = format_parameters("a red circle", None, **BASE)
    chunks = dict(_png_chunks(png_bytes(_image(), latin)))
    assert chunks[b"tEXt"] == b"parameters\x00" + latin.encode("latin-1")
    unicode = format_parameters("кот в сапогах 🐈", None, **BASE)
    itxt = dict(_png_chunks(png_bytes(_image(), unicode)))[b"iTXt"]
    assert itxt.startswith(b"parameters\x00") and unicode.encode("utf-8") in itxt
    assert read_parameters(png_bytes(_image(), unicode)) == unicode
    assert read_parameters(png_bytes(_image(), None)) is None


def test_read_parameters_takes_bytes_paths_and_open_images(tmp_path):
    text = format_parameters("a blue square", "red", **BASE)
    path = save_png(_image(), tmp_path / "a.png", text)
    assert read_parameters(path) == read_parameters(str(path)) == read_parameters(path.read_bytes()) == text
    with Image.open(path) as image:
        assert read_parameters(image) == text
        assert np.array_equal(np.asarray(image), np.asarray(_image()))


def test_existing_tools_read_what_is_written(tmp_path):
    """sd-parsers (an independent reader of A1111 PNGs) finds prompt, negative, sampler, seed, steps and model."""
    sd_parsers = pytest.importorskip("sd_parsers")
    path = save_png(_image(), tmp_path / "a.png", format_parameters("a red circle", "blurry", **BASE))
    info = sd_parsers.ParserManager().parse(str(path))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "original" and sampler.model.name == "tiny"
    assert [p.value for p in sampler.prompts] == ["a red circle"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry"]
    found = {k: str(v) for k, v in sampler.parameters.items()}
    assert found.items() >= {"seed": "1234567", "steps": "50", "cfg_scale": "3.0"}.items(), found


def test_save_png_refuses_to_replace_a_file_unless_asked(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match="already exists"):
        save_png(_image(), target, "x")
    assert target.read_bytes() == b"the user's file"
    save_png(_image(7), target, "y", overwrite=True)
    assert read_parameters(target) == "y" and np.asarray(Image.open(target))[0, 0, 0] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left behind


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_temporary(tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt  # as if Ctrl-C arrived between writing and renaming

    monkeypatch.setattr(png_info.os, "link", crash)
    with pytest.raises(KeyboardInterrupt):
        save_png(_image(), tmp_path / "out.png", "x")
    assert list(tmp_path.iterdir()) == []


def test_saved_png_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_png(_image(), tmp_path / "out.png", None)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_png_into_a_missing_folder_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_png(_image(), tmp_path / "missing" / "out.png", None)
