"""Names every part of the package agrees on: a model's components, dtype names, a model's sampling defaults.

Loaders (:mod:`kandinsky3.weights`), pipelines, the command line and the server import them from here, so
each is defined once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

__all__ = ["COMPONENTS", "DTYPES", "DTYPE_NAMES", "SamplingDefaults", "parse_dtype"]

COMPONENTS = ("unet", "movq", "text_encoder")  # the separately stored networks of a model, in load/write order

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # the storage dtypes offered on the command line
_LONG_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None -> None ("as stored"); a floating torch dtype -> itself; a name -> its dtype.

    Names (any case): "fp32"/"float32", "fp16"/"float16", "bf16"/"bfloat16", "fp64"/"float64". Anything else is a
    ValueError that says what is accepted.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"unknown dtype {dtype}: weights need a floating dtype")
        return dtype
    name = dtype.lower() if isinstance(dtype, str) else dtype
    name = _LONG_NAMES.get(name, name)
    if name not in DTYPES:
        accepted = sorted([*DTYPES, *_LONG_NAMES])
        raise ValueError(f"unknown dtype {dtype!r}; use a floating torch dtype or one of {accepted}")
    return DTYPES[name]


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model renders with when the caller does not say: image size in pixels, and, where its trainer
    recorded them, guidance scale w (ε = (w+1)·ε_cond − w·ε_uncond), sampler name and that sampler's step count
    (``steps`` goes with ``sampler``: it applies when that sampler runs).

    None means "the pipeline's own default". The released Kandinsky 3.0 / 3.1 models render at 1024×1024, which
    is what ``SamplingDefaults()`` holds; a model trained at another size records that size in its manifest
    (``kandinsky3.json``, see :mod:`kandinsky3.weights.native`).
    """

    width: int = 1024
    height: int = 1024
    guidance_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None

    def __post_init__(self):
        for name in ("width", "height", "steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"sampling default {name} must be a positive integer, got {value!r}")
        if self.guidance_scale is not None and not (isinstance(self.guidance_scale, (int, float))
                                                    and self.guidance_scale >= 0):
            raise ValueError(f"sampling default guidance_scale must be a number >= 0, got {self.guidance_scale!r}")
        if self.sampler is not None and not (isinstance(self.sampler, str) and self.sampler):
            raise ValueError(f"sampling default sampler must be a sampler name, got {self.sampler!r}")

    def to_dict(self) -> dict[str, Any]:
        """The manifest form: width and height always, the other fields only when set."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingDefaults:
        """Inverse of :meth:`to_dict`; unknown keys, or a missing width/height, are a ValueError naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"sampling_defaults must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {field.name for field in fields(cls)})
        missing = sorted({"width", "height"} - set(data))
        if unknown or missing:
            raise ValueError(f"sampling_defaults: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)
