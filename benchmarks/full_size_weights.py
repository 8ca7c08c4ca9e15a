"""Write a full-size Kandinsky 3 with random weights in the diffusers layout of the Hub repo, streaming.

    python benchmarks/full_size_weights.py /path/to/folder          # ~24 GB on disk, ~0.5 GB of RAM

The folder looks like ``kandinsky-community/kandinsky-3`` with its fp16 variant: ``model_index.json``,
``unet/`` (Kandinsky3UNet, 3.0B), ``movq/`` (VQModel with SpatialNorm, 270M), ``text_encoder/`` (the 8.7B
Flan-UL2 encoder config, four ``model.fp16-*.safetensors`` shards + index), ``tokenizer/`` and ``scheduler/``.
Both this package and diffusers load it, so the two pipelines can be compared on the same files
(``benchmarks/pipeline_memory.py``). Every tensor is generated and written one at a time, so writing the 17 GB
text encoder never holds more than its largest tensor (the 263 MB embedding).

Weights are uniform in ±1/sqrt(fan_in) (PyTorch's default init; norms 1/0), which keeps activations finite in
bf16 — the numbers are meaningless, the sizes, layouts and costs are the real ones. The tokenizer is a small
sentencepiece model trained on a few sentences (the real one cannot be downloaded here); its ids lie inside
the real 32128-token vocabulary.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kandinsky3.weights.safe_io import write_safetensors  # noqa: E402

FLAN_UL2_ENCODER = dict(
    d_model=4096, d_kv=256, d_ff=16384, num_layers=32, num_heads=16, vocab_size=32128,
    feed_forward_proj="gated-silu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    dropout_rate=0.0, layer_norm_epsilon=1e-6, tie_word_embeddings=False, is_encoder_decoder=False,
)
MOVQ = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3, block_out_channels=[256, 512, 512, 1024],
    layers_per_block=2, latent_channels=4, norm_num_groups=32, norm_type="spatial", num_vq_embeddings=16384,
    vq_embed_dim=4, sample_size=32,
)
T5_SHARDS = 4


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """PyTorch-default-like init: norm weights 1, biases 0, everything else U(±1/sqrt(fan_in))."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = "norm" in name.lower() or "layer_norm" in name
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if is_norm and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(shape, generator=generator) * (2 * bound) - bound).to(dtype)


def write_random(path: Path, layout: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int) -> int:
    """Stream one safetensors file of random tensors; returns its size in bytes."""
    generator = torch.Generator().manual_seed(seed)
    write_safetensors(path, {k: (shape, dtype) for k, shape in layout.items()},
                      lambda name: random_tensor(name, layout[name], dtype, generator), {"format": "pt"})
    return path.stat().st_size


def meta_layout(model: torch.nn.Module, drop: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in drop}


def write_unet_and_movq(root: Path) -> None:
    from diffusers import Kandinsky3UNet, VQModel

    for name, cls, kwargs, seed in (("unet", Kandinsky3UNet, {}, 1), ("movq", VQModel, MOVQ, 2)):
        with torch.device("meta"):
            model = cls(**kwargs)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        model.save_config(str(folder))
        size = write_random(folder / "diffusion_pytorch_model.fp16.safetensors", meta_layout(model), torch.float16, seed)
        print(f"{name}: {size / 2**30:.2f} GiB")


def write_text_encoder(root: Path) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**FLAN_UL2_ENCODER)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    layout = meta_layout(model, drop=("encoder.embed_tokens.weight",))  # tied to shared.weight
    folder = root / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    config.dtype = torch.float16
    config.save_pretrained(str(folder))
    keys = list(layout)
    total = sum(math.prod(shape) * 2 for shape in layout.values())
    shards: list[list[str]] = [[] for _ in range(T5_SHARDS)]
    running = 0
    for key in keys:  # contiguous shards of about equal size, in state-dict order (as transformers writes them)
        shards[min(T5_SHARDS - 1, running * T5_SHARDS // total)].append(key)
        running += math.prod(layout[key]) * 2
    weight_map = {}
    for index, names in enumerate(shards):
        file = f"model.fp16-{index + 1:05d}-of-{T5_SHARDS:05d}.safetensors"
        size = write_random(folder / file, {k: layout[k] for k in names}, torch.float16, 100 + index)
        weight_map.update({k: file for k in names})
        print(f"text_encoder shard {index + 1}/{T5_SHARDS}: {size / 2**30:.2f} GiB")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.fp16.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(root: Path) -> None:
    import sentencepiece as spm
    from transformers import T5Tokenizer

    corpus = ["a red cat sitting on a chair", "a city at night with neon lights", "an astronaut riding a horse",
              "a bowl of soup that looks like a monster", "portrait of an old man, oil on canvas"] * 8
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, model_type="unigram",
                                   vocab_size=100, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(root / "tokenizer"))


def write_pipeline_files(root: Path) -> None:
    from diffusers import DDPMScheduler

    DDPMScheduler(beta_schedule="squaredcos_cap_v2", steps_offset=1, clip_sample=True).save_pretrained(
        str(root / "scheduler"))
    index = {
        "_class_name": "Kandinsky3Pipeline", "_diffusers_version": "0.42.1",
        "movq": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "unet": ["diffusers", "Kandinsky3UNet"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    args.folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(args.folder)
    write_pipeline_files(args.folder)
    write_unet_and_movq(args.folder)
    write_text_encoder(args.folder)
    print(f"wrote {args.folder} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
