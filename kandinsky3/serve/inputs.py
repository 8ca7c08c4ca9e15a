"""What a request body holds, read strictly: typed fields, base64 and uploaded images, "WxH" sizes.

    fields = Fields(await read_json(request))
    steps = fields.integer("steps", None, minimum=1)        # UsageError "steps must be an integer, got 'ten'"
    image = decode_image(fields.string("init_image"), "init_images[0]", max_side=8192)

Every mistake is a :class:`~kandinsky3.errors.UsageError` naming the field and what it accepts; unknown fields are
left alone (clients send many we do not use). Images are decoded from memory only, and their header size is
checked before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import UsageError

__all__ = ["Fields", "decode_image", "open_image", "parse_json", "parse_size"]

_MISSING = object()


def parse_json(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; anything else is a UsageError."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


class Fields:
    """Typed access to a JSON object's fields. A missing field or null gives ``default``; a value of the wrong
    type is a UsageError naming the field."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def _get(self, name: str, default: Any) -> Any:
        value = self.data.get(name, _MISSING)
        return default if value is _MISSING or value is None else value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self._get(name, default)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{name} must be a string, got {value!r}")
        return value

    def integer(self, name: str, default: int | None = None, *, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        """An int (an integral float such as 20.0 too; never a bool or a string) in [minimum, maximum]."""
        return self._numeric(name, default, minimum, maximum, integral=True)

    def number(self, name: str, default: float | None = None, *, minimum: float | None = None,
               maximum: float | None = None) -> float | None:
        """A finite int or float in [minimum, maximum], as a float."""
        return self._numeric(name, default, minimum, maximum, integral=False)

    def _numeric(self, name: str, default: float | None, minimum: float | None, maximum: float | None, *,
                 integral: bool) -> int | float | None:
        value = self._get(name, default)
        if value is None:
            return None
        wrong = isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and (not math.isfinite(value) or (integral and not value.is_integer())))
        if wrong:
            raise UsageError(f"{name} must be {'an integer' if integral else 'a finite number'}, got {value!r}")
        _check_range(name, value, minimum, maximum)
        return int(value) if integral else float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        """true/false, or 0/1 (A1111 clients send inpainting_mask_invert as 0/1)."""
        value = self._get(name, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise UsageError(f"{name} must be true/false or 0/1, got {value!r}")

    def strings(self, name: str) -> list[str]:
        """A list of strings (a single string counts as a list of one)."""
        value = self._get(name, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise UsageError(f"{name} must be a list of strings")
        return value


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise UsageError(f"{name} must be in [{low}, {high}], got {value}")


def parse_size(size: str | None, name: str = "size") -> tuple[int, int] | None:
    """"WxH" → (W, H); None or "auto" → None."""
    if size is None or size == "auto":
        return None
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise UsageError(f"{name} must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}")
    return int(width), int(height)


def decode_image(data: str, name: str, *, max_side: int) -> Image.Image:
    """A base64 image, raw or as a data URL ("data:image/png;base64,...")."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise UsageError(f"{name} is not valid base64") from None
    return open_image(raw, name, max_side=max_side)


def open_image(raw: bytes, name: str, *, max_side: int) -> Image.Image:
    """The image in ``raw`` (PNG, JPEG, WebP, ...), fully decoded; refused before decoding when a side is over
    ``max_side`` or the bytes are no image."""
    try:
        image = Image.open(io.BytesIO(raw))
        if max(image.size) > max_side:
            raise UsageError(f"{name} is {image.width}x{image.height}; sides over {max_side} pixels are refused")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise UsageError(f"{name} could not be decoded as an image ({type(error).__name__})") from None
    return image
