#!/bin/bash
# A block diffusion model for the speed-against-quality benchmark's exact-cache rows, on a CPU: the shipped model
# fine-tuned into a block model (blocks of 32 tokens, BD3-LM's objective) on the shipped model's training corpus, from
# the repository root. It is not the shipped recipe (that is train_on_gpu.sh's, on a GPU): a short run of small
# batches, what a 2-core CPU does in about half an hour. Then the held-out bits per token (the block-factorised bound
# for block models) on the first held-out files of the shipped model, of its weights run as a block model untrained
# (blocks of 32), and of the fine-tuned one. Usage: bash benchmarks/default_model/finetune_block_on_cpu.sh OUTPUT_DIR
# [STEPS]
set -euo pipefail
OUTPUT_DIR=${1:?usage: finetune_block_on_cpu.sh OUTPUT_DIR [STEPS]}
STEPS=${2:-300}
SHIPPED=$(python -c "from diffuapriel_hf import default_model_path; print(default_model_path())")
mapfile -t FILES < <(python -m diffuapriel_hf.training.stdlib_corpus train)
python -m diffuapriel_hf.training.train --train_files "${FILES[@]}" --model_name_or_path "$SHIPPED" --block_size 32 \
    --seq_len 256 --per_device_train_batch_size 8 --max_steps "$STEPS" --learning_rate 5e-4 --warmup_steps 20 \
    --lr_scheduler_type cosine --weight_decay 0.1 --seed 0 --eval_fraction 0 --save_steps 1000000 --logging_steps 25 \
    --use_cpu --output_dir "$OUTPUT_DIR/block32"
python - "$SHIPPED" "$OUTPUT_DIR/untrained-block32" <<'PY'
import sys
from transformers import AutoTokenizer
from diffuapriel_hf import DiffuAprielForMaskedLM
shipped, folder = sys.argv[1:]
DiffuAprielForMaskedLM.from_pretrained(shipped, block_size=32).save_pretrained(folder)
AutoTokenizer.from_pretrained(shipped).save_pretrained(folder)
PY
python benchmarks/default_model/evaluate.py "$SHIPPED" "$OUTPUT_DIR/untrained-block32" "$OUTPUT_DIR/block32" --files 4 \
    --num_samples 8 --output "$OUTPUT_DIR/heldout.json"
