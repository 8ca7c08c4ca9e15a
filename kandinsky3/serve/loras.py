"""LoRAs the server offers: the files of ``--lora-dir`` (:class:`LoraLibrary`) and the adapters a worker has loaded
into one pipeline's modules (:class:`LoadedLoras`).

    library = LoraLibrary("loras/", {"text-to-image": unet, "img2img": unet, "inpainting": inpaint_unet})
    library.entries()                                  # what GET /sdapi/v1/loras lists
    library.check([("style", 0.8)], "text-to-image")   # before the queue: ((name, scale), ...) or UsageError
    LoadedLoras(pipe, library).apply((("style", 0.8),))  # in the worker, before sampling

A request names LoRAs in its prompt with AUTOMATIC1111's ``<lora:name:scale>`` tags
(:func:`kandinsky3.lora.parse_prompt_loras`); ``name`` is the file's stem. The folder is scanned (not recursively)
at start and on :meth:`LoraLibrary.refresh`; a file that is not a Kandinsky 3 LoRA, or whose base U-Net is none of
the served pipelines', is skipped with a warning. A file made for the text-to-image U-Net serves text-to-image and
img2img; one made for the inpainting U-Net serves inpainting.

Adapters stay loaded once used (at most ``LoadedLoras.capacity`` per pipeline, the least recently used unloaded
first); a request sets the scale of the ones it names and 0 for the others, which leaves the modules' outputs
exactly as without the adapter.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from ..errors import UsageError
from ..lora import BaseIdentity, base_identity, read_lora

logger = logging.getLogger(__name__)

__all__ = ["LoadedLoras", "LoraEntry", "LoraLibrary", "Tags", "adapter_name"]

Tags = tuple[tuple[str, float], ...]  # ((name, scale), ...) of one request, in prompt order
_SHOWN_NAMES = 20  # an unknown-name message lists at most this many of the available ones


@dataclass(frozen=True)
class LoraEntry:
    """One usable file of the folder: its ``name`` (the stem, what a prompt tag names), ``path``, safetensors
    ``metadata``, the ``tasks`` whose U-Net it was made for, and ``stamp`` (mtime, size: a changed file is loaded
    again)."""

    name: str
    path: Path
    metadata: Mapping[str, str]
    tasks: frozenset[str]
    stamp: tuple[int, int]

    def as_a1111(self) -> dict:
        """AUTOMATIC1111's ``/sdapi/v1/loras`` item."""
        return {"name": self.name, "alias": self.name, "path": str(self.path), "metadata": dict(self.metadata)}


class LoraLibrary:
    """The LoRA files of ``directory`` (None: none) that fit one of ``bases`` ({task: U-Net})."""

    def __init__(self, directory: str | Path | None, bases: Mapping[str, nn.Module]):
        self.directory = None if directory is None else Path(directory)
        self._entries: dict[str, LoraEntry] = {}
        self._lock = threading.Lock()
        if self.directory is None:
            self._bases: dict[str, BaseIdentity] = {}
            return
        if not self.directory.is_dir():
            raise UsageError(f"--lora-dir {self.directory}: no such folder")
        if importlib.util.find_spec("peft") is None:
            raise UsageError("--lora-dir needs the peft package: pip install 'kandinsky3[lora]' (or pip install peft)")
        self._bases = {task: base_identity(unet) for task, unet in bases.items()}
        self.refresh()

    def entries(self) -> list[LoraEntry]:
        """The usable files, by name."""
        return sorted(self._entries.values(), key=lambda entry: entry.name)

    def refresh(self) -> None:
        """Scan the folder again (``*.safetensors``, not recursively)."""
        if self.directory is None:
            return
        with self._lock:
            if self.directory.is_dir():
                paths = sorted(path for path in self.directory.glob("*.safetensors") if path.is_file())
            else:
                logger.warning("LoRA folder %s is gone; no LoRAs are offered", self.directory)
                paths = []
            found = [self._scan(path) for path in paths]
            self._entries = {entry.name: entry for entry in found if entry is not None}
        logger.info("%d LoRAs in %s: %s", len(self._entries), self.directory, ", ".join(self._entries) or "none")

    def _scan(self, path: Path) -> LoraEntry | None:
        """The entry of ``path``, or None (logged) when it is not a LoRA for any served U-Net."""
        if set(path.stem) & set("<>:"):
            logger.warning("skipping LoRA file %s: a prompt tag <lora:name:scale> cannot name it", path)
            return None
        try:
            stat = path.stat()
            lora = read_lora(path, tensors=False)  # the header: a folder of large files lists fast
        except (OSError, ValueError) as error:  # CheckpointError and UsageError are ValueErrors
            reason = str(error)
            logger.warning("skipping LoRA file %s", reason if reason.startswith(str(path)) else f"{path}: {reason}")
            return None
        tasks = frozenset(task for task, base in self._bases.items() if lora.base.matches(base))
        if not tasks:
            served = "; ".join(sorted({base.describe() for base in self._bases.values()}))
            logger.warning("skipping LoRA file %s: made for %s, which is not a U-Net served here (%s)", path,
                           lora.base.describe(), served)
            return None
        return LoraEntry(path.stem, path, lora.metadata, tasks, (stat.st_mtime_ns, stat.st_size))

    def get(self, name: str) -> LoraEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise UsageError(self._unknown(name))
        return entry

    def _unknown(self, name: str) -> str:
        if self.directory is None:
            return f"unknown LoRA {name!r} in the prompt: this server offers no LoRAs (it was started without " \
                   "--lora-dir)"
        names = sorted(self._entries)
        shown = ", ".join(names[:_SHOWN_NAMES]) + (f", … ({len(names)} in all)" if len(names) > _SHOWN_NAMES else "")
        return f"unknown LoRA {name!r} in the prompt; available: {shown or 'none'} (GET /sdapi/v1/loras lists them)"

    def check(self, tags: Sequence[tuple[str, float]], task: str) -> Tags:
        """The ``<lora:name:scale>`` tags of a request for ``task``, checked: each name offered for that task, once,
        with a finite scale."""
        checked: dict[str, float] = {}
        for name, scale in tags:
            entry = self.get(name)
            if task not in entry.tasks:
                raise UsageError(f"LoRA {name!r} was made for another U-Net than the {task} model's; it serves "
                                 f"{', '.join(sorted(entry.tasks))}")
            if not math.isfinite(scale):
                raise UsageError(f"LoRA {name!r}: the scale must be a finite number, got {scale}")
            if name in checked:
                raise UsageError(f"LoRA {name!r} is named twice in the prompt")
            checked[name] = scale
        return tuple(checked.items())


def adapter_name(name: str) -> str:
    """The peft adapter name of the file stem ``name`` (letters, digits, '_' and '-'; distinct stems stay
    distinct)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class LoadedLoras:
    """The adapters loaded into one pipeline's U-Net and text encoder. Used by that pipeline's worker only, so it
    needs no lock. ``capacity``: adapters kept loaded (beyond it, the least recently used are unloaded)."""

    def __init__(self, pipe, library: LoraLibrary, capacity: int = 4):
        self.pipe, self.library, self.capacity = pipe, library, capacity
        self._loaded: collections.OrderedDict[str, tuple[str, tuple[int, int]]] = collections.OrderedDict()

    @property
    def names(self) -> list[str]:
        """The loaded LoRAs, least recently used first."""
        return list(self._loaded)

    def apply(self, tags: Tags) -> None:
        """Make the adapters act as ``tags`` say: those named at their scales, every other one at scale 0."""
        wanted = dict(tags)
        for name, (adapter, _) in self._loaded.items():
            if name not in wanted:
                self.pipe.set_lora_scale(adapter, 0.0)
        for name, scale in wanted.items():
            self.pipe.set_lora_scale(self._load(name), scale)
            self._loaded.move_to_end(name)
        for name in [n for n in self._loaded if n not in wanted][:max(0, len(self._loaded) - self.capacity)]:
            self.pipe.unload_lora(self._loaded.pop(name)[0])

    def _load(self, name: str) -> str:
        """The adapter of LoRA ``name``, loaded (at scale 0) unless it is already, from the file as scanned."""
        entry = self.library.get(name)  # a refresh may have removed it since the request was checked
        loaded = self._loaded.get(name)
        if loaded is not None and loaded[1] == entry.stamp:
            return loaded[0]
        if loaded is not None:
            self.pipe.unload_lora(self._loaded.pop(name)[0])
        try:
            adapter = self.pipe.load_lora(entry.path, scale=0.0, name=adapter_name(name))
        except (OSError, ValueError) as error:  # the file changed or does not fit the modules
            raise UsageError(f"LoRA {name!r} could not be loaded: {error}") from error
        self._loaded[name] = (adapter, entry.stamp)
        return adapter
