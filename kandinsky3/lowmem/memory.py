"""How much memory a device has free, and handing freed memory back to the system.

    available_bytes("cpu")      # MemAvailable of /proc/meminfo (else the physical memory)
    available_bytes("cuda:0")   # free memory of that GPU
    return_free_memory()        # glibc's malloc_trim(0) after a phase that freed gigabytes
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

__all__ = ["available_bytes", "return_free_memory"]


def available_bytes(device: str | torch.device) -> int:
    """Bytes ``device`` can still give: free GPU memory for CUDA, ``MemAvailable`` (or else all physical memory)
    for the CPU and for other devices."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def return_free_memory() -> None:
    """Hand memory freed by a finished phase back to the system: glibc keeps freed blocks of its heaps for reuse,
    where they count as resident and add to the next phase's peak (see benchmarks/pipeline_memory.py). Does
    nothing where the C library has no ``malloc_trim`` (not Linux/glibc)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """The C library, if it has ``malloc_trim`` (loaded on first use, once per process)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None
