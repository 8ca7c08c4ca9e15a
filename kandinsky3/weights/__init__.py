"""Checkpoint reading, writing and conversion for Kandinsky 3 (original 3.0/3.1, diffusers, native layouts).

Public API::

    load_unet(path, *, variant=None, config=None, dtype=None, device="cpu", head_dim=64, groups=32)  -> UNet
    load_movq(path, *, config=None, dtype=None, device="cpu", norm_groups=32)                         -> MoVQ
    load_text_encoder(path, *, variant=None, dtype=None, device="cpu", t5_path=None)                  -> TextEncoder
    load_components(path, *, variant=None, dtype=None, device="cpu", components=COMPONENTS, ...)      -> Components
    save_native(components, folder, dtype=None, *, overwrite=False)                                   -> Path
    convert(src, dst, *, variant=None, dtype=None, components=COMPONENTS, ...)                        -> Path

``path`` is a local folder or file in any layout, or a Hub repo id. ``variant`` ("base", "flash", "inpainting")
picks the original files; None means "base" there and "whatever the folder holds" for native folders. ``dtype``
None keeps the stored dtype. ``head_dim``/``groups``/``norm_groups`` matter only when a config is inferred from an
original file's shapes. Errors about files raise :class:`CheckpointError` (a ValueError) naming the file and the
problem; :class:`HubError` (a CheckpointError) lists Hub files that could not be obtained. See SPEC §2.10-2.11,
§3.4-3.5, §4.3, §7.
"""

from kandinsky3.weights.convert import convert
from kandinsky3.weights.hub import HubError
from kandinsky3.weights.infer import infer_movq_config, infer_unet_config
from kandinsky3.weights.loading import (
    COMPONENTS,
    Components,
    load_components,
    load_movq,
    load_text_encoder,
    load_unet,
    open_checkpoint,
    save_native,
)
from kandinsky3.weights.safe_io import CheckpointError

__all__ = [
    "COMPONENTS",
    "CheckpointError",
    "Components",
    "HubError",
    "convert",
    "infer_movq_config",
    "infer_unet_config",
    "load_components",
    "load_movq",
    "load_text_encoder",
    "load_unet",
    "open_checkpoint",
    "save_native",
]
