"""Checkpoint reading, writing and conversion for Kandinsky 3 (original 3.0/3.1, diffusers, native layouts).

Public API::

    open_checkpoint(path, *, variant=None, components=COMPONENTS, t5_path=None, prefer_fp16=False)    -> Checkpoint
    component_source(path, kind, variant=None, *, t5_path=None)                     -> ModelSource | TextSource
    load_unet(path, *, variant=None, config=None, dtype=None, device="cpu", head_dim=64, groups=32)  -> UNet
    load_movq(path, *, config=None, dtype=None, device="cpu", norm_groups=32)                         -> MoVQ
    load_text_encoder(path, *, variant=None, dtype=None, device="cpu", t5_path=None, stream_t5=False) -> TextEncoder
    load_components(path, *, variant=None, dtype=None, device="cpu", components=COMPONENTS, ...)      -> Components
    write_native(folder, *, unet=None, movq=None, text_encoder=None, conditioning="original", variant="base",
                 sampling_defaults=None, scheduler_config=None, source=None, dtype=None, overwrite=False)  -> Path
    save_native(components, folder, dtype=None, *, overwrite=False)                                   -> Path
    convert(src, dst, *, variant=None, dtype=None, components=COMPONENTS, ...)                        -> Path

``path`` is a local folder or file in any layout, a Hub repo id, or a :class:`Checkpoint` returned by
:func:`open_checkpoint` (the layout is then detected once for all the components built from it). ``variant``
("base", "flash", "inpainting") picks the original files; None means "base" there and "whatever the folder holds"
for native folders. ``dtype`` None keeps the stored dtype. ``head_dim``/``groups``/``norm_groups`` matter only when
a config is inferred from an original file's shapes. A checkpoint and the loaded :class:`Components` carry the
model's :class:`SamplingDefaults` (native folders record them; the released models render at 1024×1024). Errors
about files raise :class:`CheckpointError` (a ValueError) naming the file and the problem; :class:`HubError` (a
CheckpointError) lists every Hub file the call needs that could not be obtained. See docs/architecture.md
§2.10-2.11, §3.4-3.5, §4.3 and docs/practice.md §7.
"""

from kandinsky3.components import COMPONENTS, SamplingDefaults, parse_dtype
from kandinsky3.weights.convert import convert
from kandinsky3.weights.hub import HubError
from kandinsky3.weights.infer import infer_movq_config, infer_unet_config
from kandinsky3.weights.loading import (
    Components,
    component_source,
    load_components,
    load_movq,
    load_text_encoder,
    load_unet,
    open_checkpoint,
    save_native,
)
from kandinsky3.weights.native import write_native
from kandinsky3.weights.safe_io import CheckpointError
from kandinsky3.weights.sources import Checkpoint

__all__ = [
    "COMPONENTS",
    "Checkpoint",
    "CheckpointError",
    "Components",
    "HubError",
    "component_source",
    "SamplingDefaults",
    "convert",
    "infer_movq_config",
    "infer_unet_config",
    "load_components",
    "load_movq",
    "load_text_encoder",
    "load_unet",
    "open_checkpoint",
    "parse_dtype",
    "save_native",
    "write_native",
]
