"""Generation parameters inside PNG files, in AUTOMATIC1111's ``parameters`` text format.

The text sits in a PNG text chunk named "parameters" (tEXt, or iTXt when it is not Latin-1), the place where
AUTOMATIC1111, Forge, ComfyUI's readers, image browsers and ``sd-parsers`` look. Its shape::

    a red cat on a chair, oil painting                      ← the prompt (may span several lines)
    Negative prompt: blurry                                 ← only when there is one
    Steps: 50, Sampler: original, CFG scale: 3.0, Seed: 42, Size: 1024x1024, Model: ai-forever/Kandinsky3.1

The last line is ``Key: value`` pairs separated by ", "; a value holding a comma, colon, newline or quote is
written as a JSON string. "Sampler" is kandinsky3's sampler name (``--sampler``) and "CFG scale" the
``guidance_scale`` as passed, Kandinsky's w in (w+1)·ε_cond − w·ε_uncond, so both read back into the same command.

Files are written through a temporary file in the target's folder and an atomic rename (:func:`save_png`): a
reader never sees half an image, an interrupted write leaves nothing behind, and an existing file is replaced
only when asked.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["PARAMETERS_KEY", "format_parameters", "parse_parameters", "png_bytes", "read_parameters", "save_png"]

PARAMETERS_KEY = "parameters"  # the PNG text chunk's keyword
NEGATIVE_PREFIX = "Negative prompt:"
_NEEDS_QUOTES = re.compile(r'[,:\n"]')
# One "Key: value" pair of the parameter line: the value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')
_MIN_PAIRS = 3  # fewer pairs: the last line is part of the prompt, not a parameter line


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if _NEEDS_QUOTES.search(text) else text


def _label(name: str) -> str:
    """A keyword as a parameter-line key: ``denoising_strength`` → "Denoising strength"."""
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def format_parameters(
    prompt: str,
    negative_prompt: str | None = None,
    *,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    **extra: Any,
) -> str:
    """The ``parameters`` text of one image: prompt line(s), "Negative prompt: …" when there is one, then
    "Steps, Sampler, CFG scale, Seed, Size, Model" and ``extra`` (``denoising_strength=0.3`` → "Denoising
    strength: 0.3"; None values are left out)."""
    pairs = {"Steps": steps, "Sampler": sampler, "CFG scale": guidance_scale, "Seed": seed,
             "Size": f"{width}x{height}", "Model": model}
    for name, value in extra.items():
        if value is not None:
            pairs[_label(name)] = value
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items()))
    return "\n".join(lines)


def _pairs(line: str) -> dict[str, str]:
    """{key: value} of a parameter line (JSON-quoted values unquoted); {} when the line is not one."""
    pairs = {}
    for match in _PAIR.finditer(line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # not a JSON string after all: keep the text as written
        pairs[key] = value
    return pairs if len(pairs) >= _MIN_PAIRS else {}


def parse_parameters(text: str) -> dict[str, str]:
    """The fields of a ``parameters`` text: {"Prompt": …, "Negative prompt": … ("" when none), "Steps": "50",
    "Sampler": …, "CFG scale": …, "Seed": …, "Size": "WxH", …}; every value is a str, as AUTOMATIC1111 reads them."""
    lines = text.strip("\n").split("\n")
    pairs = _pairs(lines[-1])
    if pairs:
        lines = lines[:-1]
    prompt, negative = [], []
    target = prompt
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            target = negative
            line = line[len(NEGATIVE_PREFIX):].lstrip()
        target.append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **pairs}


def png_bytes(image: Image.Image, parameters: str | None) -> bytes:
    """``image`` encoded as PNG, with ``parameters`` in a "parameters" text chunk (none when None)."""
    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)  # tEXt, or iTXt (UTF-8) when the text is not Latin-1
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(source: bytes | str | os.PathLike | Image.Image) -> str | None:
    """The "parameters" text of a PNG (its bytes, a path or an opened image); None when it has none."""
    if isinstance(source, Image.Image):
        return _text_chunks(source).get(PARAMETERS_KEY)
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
        return _text_chunks(image).get(PARAMETERS_KEY)


def _text_chunks(image: Image.Image) -> dict:
    # PngImageFile.text also reads the chunks after the image data; other images only have .info
    text = getattr(image, "text", None)
    return text if isinstance(text, dict) else image.info


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None, *,
             overwrite: bool = False) -> Path:
    """Write ``image`` as a PNG carrying ``parameters`` to ``path`` atomically; returns the path.

    The bytes go to a temporary file in the same folder, which is then renamed onto ``path``: readers see the
    old file or the whole new one, and an interrupted write leaves no partial file. An existing ``path`` raises
    FileExistsError unless ``overwrite`` (the check and the rename are one step: a file created meanwhile is not
    replaced either). A missing folder raises FileNotFoundError.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise _exists(path)
    data = png_bytes(image, parameters)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # permissions: 0o666 - umask
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _rename(temporary, path, overwrite)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _rename(temporary: Path, path: Path, overwrite: bool) -> None:
    """Move ``temporary`` onto ``path``; without ``overwrite`` a hard link makes "create unless it exists" one
    atomic step (file systems without hard links fall back to check-then-rename)."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # FileExistsError when path exists
    except FileExistsError:
        raise _exists(path) from None
    except OSError:
        if path.exists():
            raise _exists(path) from None
        os.replace(temporary, path)


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
