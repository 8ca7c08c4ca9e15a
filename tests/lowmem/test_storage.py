"""Weights stored in one dtype, layers computing in another (kandinsky3.lowmem.storage)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _checkpoints import TINY_UNET, make_unet, unet_inputs

from kandinsky3 import get_T2I_pipeline
from kandinsky3.lowmem.storage import compute_dtype, compute_in, storage_dtype


def test_bf16_storage_fp32_compute_equals_fp32_model_of_rounded_weights():
    model = make_unet(TINY_UNET)
    rounded = copy.deepcopy(model).to(torch.bfloat16).to(torch.float32)  # the weights bf16 can hold
    stored = compute_in(copy.deepcopy(model).to(torch.bfloat16), torch.float32)
    assert storage_dtype(stored) == torch.bfloat16 and compute_dtype(stored) == torch.float32
    x, t, context, mask = unet_inputs(TINY_UNET)
    with torch.inference_mode():
        expected = rounded(x, t, context, mask)
        got = stored(x, t, context, mask)
    assert got.dtype == torch.float32
    # same fp32 math on the same values; only the kernels' summation order may differ with the buffers' alignment
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_compute_in_refuses_twice_and_non_floating():
    model = compute_in(make_unet(TINY_UNET).to(torch.bfloat16), torch.float32)
    with pytest.raises(ValueError, match="already computes"):
        compute_in(model, torch.float64)
    with pytest.raises(ValueError, match="floating"):
        compute_in(make_unet(TINY_UNET), torch.int32)


def test_tiny_pipeline_in_fp16_storage_computes_the_fp32_images():
    """The bundled weights are stored in fp16, so fp16 storage + fp32 math is the fp32 pipeline up to rounding."""
    reference = get_T2I_pipeline("cpu", model="tiny")
    stored = get_T2I_pipeline("cpu", model="tiny", dtype_map=torch.float16,
                              load_options={"compute_dtype": torch.float32})
    assert storage_dtype(stored.unet) == torch.float16 and compute_dtype(stored.unet) == torch.float32
    call = dict(steps=4, width=64, height=64, seed=3, progress=False, output_type="np")
    prompt = "a red circle on the left"
    np.testing.assert_allclose(stored(prompt, **call), reference(prompt, **call), rtol=0, atol=1e-5)
