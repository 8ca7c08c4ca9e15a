"""Automatic placement (kandinsky3.lowmem.placement): dtypes, T5 streaming and offload from the model's size, the
free memory and what the device computes fast; explicit arguments win."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kandinsky3.lowmem import placement
from kandinsky3.lowmem.placement import (
    component_sizes,
    half_precision_is_fast,
    parameter_count,
    plan_placement,
    t5_needs_streaming,
)

GIB = 2**30
FULL = {"unet": 3_000_000_000, "text_encoder": 8_600_000_000, "movq": 270_000_000}  # the released model
TINY = Path(placement.__file__).resolve().parent.parent / "assets" / "tiny" / "base"


def slow_half(device, dtype) -> bool:  # an AVX2 CPU without native bf16/fp16 arithmetic
    return False


def fast_half(device, dtype) -> bool:  # a CPU with AMX / AVX512-BF16, or a GPU
    return True


def _dtypes(plan, which: str) -> dict[str, torch.dtype]:
    return dict(getattr(plan, f"{which}_dtype"))


def test_full_model_on_a_24_gib_cpu_without_fast_half_is_bf16_storage_fp32_math_streamed_and_on_disk():
    plan = plan_placement("cpu", FULL, available_bytes=24 * GIB, is_fast=slow_half)
    assert set(_dtypes(plan, "storage").values()) == {torch.bfloat16}
    assert set(_dtypes(plan, "compute").values()) == {torch.float32}
    assert plan.stream_t5 is True and plan.offload == "disk"
    assert "bf16 (fp32 math)" in plan.summary and "'disk'" in plan.summary and "streamed" in plan.summary


def test_full_model_on_a_cpu_with_fast_bf16_computes_in_bf16():
    plan = plan_placement("cpu", FULL, available_bytes=24 * GIB, is_fast=fast_half)
    assert set(_dtypes(plan, "storage").values()) == set(_dtypes(plan, "compute").values()) == {torch.bfloat16}


def test_full_model_that_fits_in_fp32_stays_fp32_and_streams_t5_only_when_it_takes_over_a_third():
    plan = plan_placement("cpu", FULL, available_bytes=64 * GIB, is_fast=slow_half)
    assert set(_dtypes(plan, "storage").values()) == {torch.float32} and plan.offload is False
    assert plan.stream_t5 is True  # 34 GB of fp32 T5 > 64 GiB / 3
    roomy = plan_placement("cpu", FULL, available_bytes=128 * GIB, is_fast=slow_half)
    assert roomy.stream_t5 is False and roomy.offload is False


@pytest.mark.parametrize("is_fast", [slow_half, fast_half])
def test_bundled_tiny_model_stays_fp32_resident_and_unstreamed(is_fast):
    from kandinsky3.weights import open_checkpoint

    plan = plan_placement("cpu", component_sizes(open_checkpoint(TINY)), available_bytes=8 * GIB, is_fast=is_fast)
    assert set(_dtypes(plan, "storage").values()) == set(_dtypes(plan, "compute").values()) == {torch.float32}
    assert plan.stream_t5 is False and plan.offload is False


def test_component_sizes_are_the_parameters_of_the_loaded_networks():
    from kandinsky3.weights import load_components, open_checkpoint

    sizes = component_sizes(open_checkpoint(TINY))
    loaded = load_components(TINY)
    for name in ("unet", "movq"):  # what the weights take: parameters and persistent buffers
        assert sizes[name] == sum(t.numel() for t in getattr(loaded, name).state_dict().values()), name
    assert sizes["text_encoder"] == sum(p.numel() for p in loaded.text_encoder.parameters())  # tied embedding once
    assert parameter_count(open_checkpoint(TINY).unet_source().tensors) == sizes["unet"]  # a bare TensorSource


def test_half_request_on_a_cpu_without_fast_half_is_half_storage_with_fp32_math_and_says_so():
    fp16 = {"unet": torch.float16, "movq": torch.float16}  # the 3.0 API's fp16=True: the text encoder is decided
    plan = plan_placement("cpu", FULL, dtype=fp16, available_bytes=24 * GIB, is_fast=slow_half)
    assert _dtypes(plan, "storage") == {"unet": torch.float16, "movq": torch.float16, "text_encoder": torch.bfloat16}
    assert set(_dtypes(plan, "compute").values()) == {torch.float32}
    assert "fp16 requested for unet, movq: stored in fp16, computed in fp32" in plan.summary
    whole = plan_placement("cpu", FULL, dtype=torch.bfloat16, available_bytes=24 * GIB, is_fast=slow_half)
    assert "bf16 requested for unet, movq, text_encoder" in whole.summary


def test_half_request_on_a_fast_device_computes_in_half_and_explicit_compute_wins():
    plan = plan_placement("cpu", FULL, dtype=torch.float16, available_bytes=24 * GIB, is_fast=fast_half)
    assert set(_dtypes(plan, "compute").values()) == {torch.float16} and "requested" not in plan.summary
    forced = plan_placement("cpu", FULL, dtype=torch.float16, compute_dtype={"unet": torch.bfloat16},
                            available_bytes=24 * GIB, is_fast=slow_half)
    assert _dtypes(forced, "compute") == {"unet": torch.bfloat16, "movq": torch.float32,
                                          "text_encoder": torch.float32}


def test_asked_for_fp32_math_is_not_reported_as_a_slow_device():
    asked = plan_placement("cpu", FULL, dtype=torch.bfloat16, compute_dtype=torch.float32,
                           available_bytes=24 * GIB, is_fast=fast_half)
    assert set(_dtypes(asked, "compute").values()) == {torch.float32} and "no fast" not in asked.summary


def test_explicit_stream_and_offload_override_the_rules():
    plan = plan_placement("cpu", FULL, dtype=torch.float32, stream_t5=False, offload=False,
                          available_bytes=24 * GIB, is_fast=slow_half)
    assert set(_dtypes(plan, "storage").values()) == {torch.float32}
    assert plan.stream_t5 is False and plan.offload is False
    on_disk = plan_placement("cpu", {"unet": 10, "text_encoder": 10, "movq": 10}, offload="disk",
                             available_bytes=24 * GIB, is_fast=slow_half)
    assert on_disk.stream_t5 is True  # the streamed T5 is the on-disk text encoder
    assert plan_placement("cpu", FULL, stream_t5="auto", available_bytes=24 * GIB, is_fast=slow_half).stream_t5


def test_cuda_picks_bf16_from_sm80_and_fp16_before_it_with_the_movq_kept_in_fp32():
    def ampere(device, dtype):
        return device.type == "cuda"

    def turing(device, dtype):
        return device.type == "cuda" and dtype == torch.float16

    new = plan_placement("cuda", FULL, available_bytes=80 * GIB, is_fast=ampere)
    assert set(_dtypes(new, "storage").values()) == set(_dtypes(new, "compute").values()) == {torch.bfloat16}
    old = plan_placement("cuda", FULL, available_bytes=80 * GIB, is_fast=turing)
    assert _dtypes(old, "storage") == {"unet": torch.float16, "movq": torch.float32, "text_encoder": torch.float16}
    assert _dtypes(old, "compute") == _dtypes(old, "storage")


def test_a_model_too_big_for_the_gpu_waits_in_host_memory_or_else_on_disk():
    def gpu(device, dtype):
        return device.type == "cuda"

    in_host = plan_placement("cuda", FULL, available_bytes=16 * GIB, host_bytes=64 * GIB, is_fast=gpu)
    assert in_host.offload is True and in_host.stream_t5 is True  # 16 GiB of bf16 T5 > 16 GiB / 3
    on_disk = plan_placement("cuda", FULL, available_bytes=16 * GIB, host_bytes=16 * GIB, is_fast=gpu)
    assert on_disk.offload == "disk"
    fits = plan_placement("cuda", FULL, available_bytes=80 * GIB, host_bytes=1, is_fast=gpu)
    assert fits.offload is False


def test_components_on_different_devices_are_planned_per_device():
    devices = {"unet": "cuda:0", "movq": "cuda:0", "text_encoder": "cpu"}
    plan = plan_placement(devices, FULL, available_bytes=24 * GIB, is_fast=lambda device, dtype: device.type == "cuda")
    assert _dtypes(plan, "storage")["unet"] == torch.bfloat16 and _dtypes(plan, "compute")["unet"] == torch.bfloat16
    assert _dtypes(plan, "storage")["text_encoder"] == torch.bfloat16
    assert _dtypes(plan, "compute")["text_encoder"] == torch.float32  # this CPU is slow at bf16
    assert "on cuda:0" in plan.summary and "on cpu" in plan.summary


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sizes must give"):
        plan_placement("cpu", {"unet": 1}, available_bytes=GIB, is_fast=slow_half)
    with pytest.raises(ValueError, match="offload must be"):
        plan_placement("cpu", FULL, offload="ram", available_bytes=GIB, is_fast=slow_half)
    with pytest.raises(ValueError, match="stream_t5 must be"):
        plan_placement("cpu", FULL, stream_t5="sometimes", available_bytes=GIB, is_fast=slow_half)
    with pytest.raises(ValueError, match="unknown components"):
        plan_placement("cpu", FULL, dtype={"vae": torch.float16}, available_bytes=GIB, is_fast=slow_half)
    with pytest.raises(TypeError, match="floating torch dtype"):
        plan_placement("cpu", FULL, dtype=torch.int8, available_bytes=GIB, is_fast=slow_half)
    with pytest.raises(ValueError, match="every component"):
        plan_placement({"unet": "cpu"}, FULL, available_bytes=GIB, is_fast=slow_half)


def test_plan_is_frozen():
    plan = plan_placement("cpu", FULL, available_bytes=24 * GIB, is_fast=slow_half)
    with pytest.raises(AttributeError):
        plan.offload = False
    with pytest.raises(TypeError):
        plan.storage_dtype["unet"] = torch.float32


def test_t5_streams_when_it_would_take_more_than_a_third_of_free_memory():
    assert t5_needs_streaming(11, 30) and not t5_needs_streaming(10, 30)


def test_half_precision_on_cuda_follows_the_compute_capability(monkeypatch):
    for capability, bf16 in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert half_precision_is_fast("cuda", torch.bfloat16) is bf16
        assert half_precision_is_fast("cuda:0", torch.float16) is True
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        half_precision_is_fast("cpu", torch.float32)


@pytest.fixture
def fresh_cpu_answer():
    """The CPU's answer is cached per process: forget it before and after a test that fakes the CPU."""
    placement._cpu_half_is_fast.cache_clear()
    yield
    placement._cpu_half_is_fast.cache_clear()


def test_half_precision_on_the_cpu_follows_its_flags(monkeypatch, fresh_cpu_answer):
    monkeypatch.setattr(placement, "_cpu_flags", lambda: {"avx2", "fma"})
    assert not half_precision_is_fast("cpu", torch.bfloat16) and not half_precision_is_fast("cpu", torch.float16)
    monkeypatch.setattr(placement, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    placement._cpu_half_is_fast.cache_clear()
    assert half_precision_is_fast("cpu", torch.bfloat16) and not half_precision_is_fast("cpu", torch.float16)


def test_without_cpu_flags_a_timed_gemm_decides_once_per_process(monkeypatch, fresh_cpu_answer):
    timings = []

    def timed(dtype, side=256, repeats=3):
        timings.append(dtype)
        return {torch.float32: 1.0, torch.bfloat16: 0.5, torch.float16: 4.0}[dtype]

    monkeypatch.setattr(placement, "_cpu_flags", lambda: None)  # no x86 flags to read (macOS, ARM)
    monkeypatch.setattr(placement, "_half_gemm_seconds", timed)
    assert half_precision_is_fast("cpu", torch.bfloat16) and not half_precision_is_fast("cpu", torch.float16)
    assert half_precision_is_fast("cpu", torch.bfloat16)
    assert timings.count(torch.bfloat16) == 1


def test_the_timed_gemm_measures_a_positive_time():
    assert 0 < placement._half_gemm_seconds(torch.float32, side=32, repeats=1) < 1
