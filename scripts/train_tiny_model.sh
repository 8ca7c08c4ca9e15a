#!/usr/bin/env bash
# Train the bundled small model from scratch and write it where the package looks for it.
#
#   bash scripts/train_tiny_model.sh [OUT]      # OUT defaults to kandinsky3/assets/tiny
#
# Five resumable stages (run the script again after an interruption: each stage continues from its last
# checkpoint, a finished stage is skipped): MoVQ (128 px, 8x); its decoder fine-tuned alone on the unquantised
# latents the pipelines decode (the encoder, and so the latent space, frozen); the small T5 encoder, pretrained
# on the captions alone (kandinsky3/training/train_text.py); the U-Net with that T5 frozen; the inpainting U-Net.
# Each stage uses both cores as two threads of one process (benchmarks/README.md, "train_step.py": two
# single-thread DDP ranks are no faster, and running anything else beside it slows it several times over).
# Fixed seeds: the same command on the same machine gives the same model.
# Run folders are runs/small_movq, runs/small_movq_decoder, runs/small_text, runs/small_unet, runs/small_inpainting
# (not in git).
set -euo pipefail
OUT="${1:-kandinsky3/assets/tiny}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

for stage in small_movq small_movq_decoder small_text small_unet small_inpainting; do
  resume=""
  if [ -f "runs/${stage}/checkpoint.pt" ]; then resume="--resume"; fi   # a stage already started continues
  kandinsky3 train "configs/${stage}.json" $resume
done

kandinsky3 convert runs/small_unet/final "$OUT/base" --dtype fp16 --overwrite
kandinsky3 convert runs/small_inpainting/final "$OUT/inpainting" --dtype fp16 --overwrite
# the inpainting model shares T5, tokenizer and MoVQ with the base: link them instead of storing them twice
for file in config.json model.safetensors tokenizer.json tokenizer_config.json; do
  ln -sf "../../base/text_encoder/$file" "$OUT/inpainting/text_encoder/$file"
done
rm -rf "$OUT/inpainting/movq" && ln -s ../base/movq "$OUT/inpainting/movq"
echo "wrote $OUT/base and $OUT/inpainting"
