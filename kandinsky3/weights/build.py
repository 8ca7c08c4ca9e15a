"""Turn layout-neutral sources (:mod:`kandinsky3.weights.sources`) into networks.

Networks are built on the meta device, every tensor of the source is checked (names and shapes) against the
network's own state dict, cast one at a time to the target dtype on the target device, and attached with
``load_state_dict(strict=True, assign=True)``: no full-precision copy of the model is ever materialised. When the
dtype is unchanged, tensors of a memory-mapped ``.pt`` file are used in place (pages are read on first use).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kandinsky3.lowmem.t5_stream import load_streamed_t5, should_stream
from kandinsky3.models.movq import MoVQ, MoVQConfig
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.models.unet import UNet
from kandinsky3.models.unet_config import UNetConfig
from kandinsky3.weights.infer import infer_movq_config, infer_unet_config
from kandinsky3.weights.safe_io import CheckpointError, check_shapes
from kandinsky3.weights.sources import ModelSource, TensorSource, TextSource
from kandinsky3.weights.t5 import load_t5, load_t5_tokenizer

__all__ = [
    "KINDS",
    "resolve_config",
    "expected_shapes",
    "instantiate",
    "instantiate_text_encoder",
]

KINDS: dict[str, tuple[type[nn.Module], type]] = {"unet": (UNet, UNetConfig), "movq": (MoVQ, MoVQConfig)}
_WHAT = {"unet": "U-Net", "movq": "MoVQ"}


def resolve_config(kind: str, source: ModelSource, config: Any = None, **infer_kwargs: Any) -> Any:
    """The config to build: ``config`` if given, else the source's own, else inferred from the shapes."""
    if config is not None:
        expected_type = KINDS[kind][1]
        if not isinstance(config, expected_type):
            raise TypeError(f"config for {kind} must be a {expected_type.__name__}, got {type(config).__name__}")
        return config
    if source.config is not None:
        return source.config
    shapes = source.tensors.shapes()
    if kind == "unet":
        return infer_unet_config(shapes, path=source.tensors.path, **infer_kwargs)
    return infer_movq_config(shapes, path=source.tensors.path, **infer_kwargs)


@functools.lru_cache(maxsize=32)
def _shapes(kind: str, config: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = KINDS[kind][0](config)
    return tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())


def expected_shapes(kind: str, config: Any) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the network's state dict, in its order (built on the meta device, cached)."""
    return dict(_shapes(kind, config))


def cast(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Move to ``device``; cast floating tensors to ``dtype`` (None: unchanged). Integers keep their dtype."""
    target = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
    return tensor.to(device=device, dtype=target)


def instantiate(
    kind: str, config: Any, tensors: TensorSource, *, dtype: torch.dtype | None = None, device="cpu"
) -> nn.Module:
    """Build ``KINDS[kind]`` from ``config`` and fill it from ``tensors`` (dtype None: the stored dtype).

    ``device="meta"`` reads no tensor data: the result is a skeleton with the checkpoint's shapes and dtypes, which
    :func:`kandinsky3.lowmem.residency.adopt` later fills (the pipelines' ``offload="disk"`` mode).
    """
    expected = expected_shapes(kind, config)
    check_shapes(tensors.shapes(), expected, tensors.path, _WHAT[kind])
    if dtype is None:
        dtype = tensors.floating_dtype()
    with torch.device("meta"):
        model = KINDS[kind][0](config)
    if torch.device(device).type == "meta":
        skeleton = {}
        for key, shape in expected.items():
            stored_dtype = tensors.meta(key)[1]
            skeleton[key] = torch.empty(shape, dtype=dtype if stored_dtype.is_floating_point else stored_dtype,
                                        device="meta")
        model.load_state_dict(skeleton, strict=True, assign=True)
        return model.eval()
    state = {}
    for key in expected:
        stored = tensors[key]
        state[key] = cast(stored, dtype, device)
        if state[key].data_ptr() != stored.data_ptr():
            tensors.release(key)  # a copy was made: drop the source's mapped pages (see safe_io.release_pages)
        del stored
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{_WHAT[kind]} tensors not in its state dict stayed on the meta device: {left[:8]}")
    return model.eval()


def _check_conditioning(text: TextSource, d_model: int) -> int:
    """Validate the projection (+ null embedding) shapes against T5's width; return the context width C."""
    where = text.conditioning_files[-1] if text.conditioning_files else None
    weight = text.conditioning.get("projection.0.weight")
    if weight is None or weight.ndim != 2:
        raise CheckpointError(where, "has no 2-D text projection weight (projection 0.weight)")
    context_dim = weight.shape[0]
    expected = {
        "projection.0.weight": (context_dim, d_model),
        "projection.1.weight": (context_dim,),
        "projection.1.bias": (context_dim,),
    }
    shapes = {key: tuple(value.shape) for key, value in text.conditioning.items() if key != "null_embedding"}
    check_shapes(shapes, expected, where, f"text projection (T5 width {d_model})")
    null = text.conditioning.get("null_embedding")
    if null is not None and null.numel() != context_dim:
        raise CheckpointError(
            text.conditioning_files[0], f"null_embedding has {null.numel()} values, expected {context_dim}"
        )
    return context_dim


def instantiate_text_encoder(
    text: TextSource, *, dtype: torch.dtype | None = None, device="cpu", stream_t5: bool | str = False,
    t5_prefetch: bool = True,
) -> TextEncoder:
    """T5 (transformers) + tokenizer + projection + null embedding (zeros when absent, diffusers style).

    dtype None: T5 as stored, projection and null embedding as stored. ``stream_t5``: True runs T5 block by block
    from its files (:mod:`kandinsky3.lowmem.t5_stream`), "auto" does so when T5 would take more than a third of
    the device's free memory, False loads it whole. ``t5_prefetch`` (streaming only) reads the next block while one
    runs: faster, and one stored block (0.5 GB for Flan-UL2 in fp16) more at the peak.
    """
    folder = Path(text.t5_folder)
    if stream_t5 not in (True, False, "auto"):
        raise ValueError(f"stream_t5 must be True, False or 'auto', got {stream_t5!r}")
    if stream_t5 == "auto":
        stream_t5 = should_stream(folder, text.t5_variant, dtype, device)
    if stream_t5:
        t5 = load_streamed_t5(folder, variant=text.t5_variant, dtype=dtype, device=device, prefetch=t5_prefetch)
    else:
        t5 = load_t5(folder, variant=text.t5_variant, dtype=dtype, device=device)
    context_dim = _check_conditioning(text, int(t5.config.d_model))
    tokenizer = load_t5_tokenizer(Path(text.tokenizer_folder))
    encoder = TextEncoder(t5, tokenizer, context_dim=context_dim)
    target = dtype if dtype is not None else text.conditioning["projection.0.weight"].dtype
    prefix = "projection."
    projection = {key[len(prefix):]: value for key, value in text.conditioning.items() if key.startswith(prefix)}
    with torch.no_grad():
        encoder.projection.to(device=device, dtype=target)
        encoder.projection.load_state_dict(projection, strict=True)
        encoder.null_embedding.data = encoder.null_embedding.data.to(device=device, dtype=target)
        if "null_embedding" in text.conditioning:
            encoder.null_embedding.copy_(text.conditioning["null_embedding"].reshape(context_dim))
    return encoder.eval()
