"""T5 encoder folders: loading with transformers, and streaming them into a single ``model.safetensors``.

The T5 network is ``transformers.T5EncoderModel`` (architecture §4.1). Source folders come in three shapes: the 3.1
``flan_ul2_encoder/`` (four ``pytorch_model-*.bin`` shards + index), the diffusers ``text_encoder/`` (fp16-variant
safetensors shards ``model.fp16-*.safetensors`` + ``model.safetensors.index.fp16.json``) and ``google/flan-ul2``
(a full encoder-decoder checkpoint: only ``shared.weight`` and ``encoder.*`` are kept).

fp16 targets keep the feed-forward output ``wo`` in fp32, as transformers itself does when it loads T5 in fp16
(``T5EncoderModel._keep_in_fp32_modules``; the activations overflow otherwise, docs/architecture.md §4.7).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kandinsky3.weights.original import read_flat_file
from kandinsky3.weights.safe_io import CheckpointError, check_shapes, first_line, write_safetensors
from kandinsky3.weights.sources import MergedSource, SafetensorsSource, TensorSource

__all__ = [
    "TOKENIZER_FILES",
    "load_t5",
    "load_t5_config",
    "load_t5_tokenizer",
    "t5_weight_source",
    "t5_target_dtypes",
    "write_t5",
    "copy_tokenizer_files",
]

TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_IGNORED_PREFIXES = ("decoder.", "lm_head.")  # a full T5 checkpoint (google/flan-ul2): the decoder is dropped


def load_t5(folder: Path, *, variant: str | None = None, dtype: torch.dtype | None = None, device="cpu"):
    """``T5EncoderModel.from_pretrained`` (dtype None: as stored), in eval mode; a missing weight is an error."""
    from transformers import T5EncoderModel

    try:
        model, info = T5EncoderModel.from_pretrained(
            str(folder), dtype=dtype if dtype is not None else "auto", variant=variant, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(folder, f"cannot be loaded as a T5 encoder ({first_line(error)})") from None
    missing = sorted(info.get("missing_keys", []))
    mismatched = [str(item) for item in info.get("mismatched_keys", [])]
    if missing or mismatched:
        raise CheckpointError(folder, f"T5 weights incomplete: missing {missing[:8]}, wrong shapes {mismatched[:8]}")
    return model.to(device).eval()


def load_t5_config(folder: Path):
    """The ``T5Config`` in ``folder/config.json`` (a full encoder-decoder config is fine)."""
    from transformers import T5Config

    try:
        return T5Config.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise CheckpointError(folder, f"holds no T5 config.json ({first_line(error)})") from None


def load_t5_tokenizer(folder: Path):
    """The T5 tokenizer stored in ``folder`` (``AutoTokenizer``: spiece.model and/or tokenizer.json)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise CheckpointError(folder, f"holds no loadable tokenizer ({first_line(error)})") from None


def _open(path: Path) -> TensorSource:
    return SafetensorsSource(path) if path.suffix == ".safetensors" else read_flat_file(path)


def t5_weight_source(folder: Path, variant: str | None = None) -> TensorSource:
    """All weights of a transformers model folder as one lazy source (single file or index + shards)."""
    tag = f".{variant}" if variant else ""
    for index_name in (f"model.safetensors.index{tag}.json", f"pytorch_model.bin.index{tag}.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise CheckpointError(index, f"lists shards that are missing: {missing}")
            return MergedSource([_open(folder / name) for name in shards], index)
    for name in (f"model{tag}.safetensors", f"pytorch_model{tag}.bin"):
        if (folder / name).is_file():
            return _open(folder / name)
    raise CheckpointError(folder, f"holds no T5 weights (model{tag}.safetensors, pytorch_model{tag}.bin or an index)")


def _tied_keys() -> set[str]:
    from transformers import T5EncoderModel

    tied = getattr(T5EncoderModel, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()


def _source_names(source: TensorSource, expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Target key -> source key; the tied embedding may be stored under either name."""
    names = {key: key for key in source if not key.startswith(_IGNORED_PREFIXES)}
    for tied in _tied_keys():
        if tied in names and tied not in expected:
            stored = names.pop(tied)
            if "shared.weight" in expected:
                names.setdefault("shared.weight", stored)
    return names


def t5_target_dtypes(
    names: list[str], source_dtypes: dict[str, torch.dtype], dtype: torch.dtype | None
) -> dict[str, torch.dtype]:
    """Per-key storage dtype: ``dtype`` for floating tensors (None: unchanged); ``wo`` stays fp32 for fp16."""
    from transformers import T5EncoderModel

    keep = set(getattr(T5EncoderModel, "_keep_in_fp32_modules", None) or [])
    result = {}
    for key in names:
        stored = source_dtypes[key]
        if dtype is None or not stored.is_floating_point:
            result[key] = stored
        elif dtype == torch.float16 and keep & set(key.split(".")):
            result[key] = torch.float32
        else:
            result[key] = dtype
    return result


def write_t5(dst: Path, config, source: TensorSource, dtype: torch.dtype | None) -> None:
    """Stream a T5 encoder into ``dst/config.json`` + ``dst/model.safetensors``, one tensor at a time.

    ``config`` is the model's ``T5Config`` (it is copied, with ``dtype`` set to the stored dtype).
    """
    import copy

    from transformers import T5EncoderModel

    config = copy.deepcopy(config)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in T5EncoderModel(config).state_dict().items()}
    for tied in _tied_keys():
        if "shared.weight" in expected:
            expected.pop(tied, None)
    names = _source_names(source, expected)
    check_shapes({key: source.meta(names[key])[0] for key in names}, expected, source.path, "T5 encoder")
    order = list(expected)
    targets = t5_target_dtypes(order, {key: source.meta(names[key])[1] for key in order}, dtype)

    def fetch(key: str) -> torch.Tensor:
        tensor = source[names[key]].to(targets[key])
        source.release(names[key])
        return tensor

    dst.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst / "model.safetensors", {k: (expected[k], targets[k]) for k in order}, fetch, {"format": "pt"})
    stored = [targets[key] for key in order if targets[key].is_floating_point and "wo" not in key.split(".")]
    if stored:
        config.dtype = stored[0]
    config.save_pretrained(str(dst))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files found in ``src`` (see TOKENIZER_FILES) to ``dst``; none at all is an error."""
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not found:
        raise CheckpointError(src, f"holds none of the tokenizer files {list(TOKENIZER_FILES)}")
    dst.mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copyfile(src / name, dst / name)
