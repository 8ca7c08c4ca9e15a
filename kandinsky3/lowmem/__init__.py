"""Running a model larger than the memory at hand, and choosing how to.

- :mod:`~kandinsky3.lowmem.storage`: weights stored in one dtype, layers computing in another (``compute_in``);
  the one marker of a module that streams its weights (``is_streamed``).
- :mod:`~kandinsky3.lowmem.t5_stream`: the T5 encoder run block by block from its files.
- :mod:`~kandinsky3.lowmem.residency`: where a pipeline's components wait between the phases of a call (resident,
  on the CPU, or in their files).
- :mod:`~kandinsky3.lowmem.memory`: free memory of a device; handing freed memory back to the system.
- :mod:`~kandinsky3.lowmem.placement`: the fastest dtypes, streaming and offload that fit, detected per machine.
"""

from kandinsky3.lowmem.memory import available_bytes, return_free_memory
from kandinsky3.lowmem.placement import (
    Placement,
    component_sizes,
    half_precision_is_fast,
    parameter_count,
    plan_placement,
)
from kandinsky3.lowmem.residency import Residency
from kandinsky3.lowmem.storage import compute_dtype, compute_in, is_streamed, storage_dtype

__all__ = [
    "Placement",
    "Residency",
    "available_bytes",
    "component_sizes",
    "compute_dtype",
    "compute_in",
    "half_precision_is_fast",
    "is_streamed",
    "parameter_count",
    "plan_placement",
    "return_free_memory",
    "storage_dtype",
]
