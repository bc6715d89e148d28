#!/bin/bash
# The recipe of the shipped default model and of its parameter-matched DiffuTran baseline, run from the repository
# root on one GPU: the same byte-level BPE tokenizer (trained by the first run), the same token sequences, schedule,
# seed and number of steps for both. Usage: bash benchmarks/default_model/train_on_gpu.sh OUTPUT_DIR [STEPS]
set -euo pipefail
OUTPUT_DIR=${1:?usage: train_on_gpu.sh OUTPUT_DIR [STEPS]}
STEPS=${2:-1800}
COMMON=(--seq_len 512 --per_device_train_batch_size 64 --max_steps "$STEPS" --learning_rate 2e-3 --warmup_steps 200
        --weight_decay 0.1 --lr_scheduler_type cosine --seed 0 --bf16 --eval_fraction 0 --save_steps 1000000
        --logging_steps 100)
mapfile -t FILES < <(python -m diffuapriel_hf.training.stdlib_corpus train)
python -m diffuapriel_hf.training.train --train_files "${FILES[@]}" --preset diffuapriel-8m --vocab_size 4096 "${COMMON[@]}" \
    --output_dir "$OUTPUT_DIR/diffuapriel-8m"
python -m diffuapriel_hf.training.train --train_files "${FILES[@]}" --preset diffutran-8m --vocab_size 4096 \
    --tokenizer "$OUTPUT_DIR/diffuapriel-8m" "${COMMON[@]}" --output_dir "$OUTPUT_DIR/diffutran-8m"
python benchmarks/default_model/evaluate.py "$OUTPUT_DIR/diffuapriel-8m" "$OUTPUT_DIR/diffutran-8m" \
    --output "$OUTPUT_DIR/heldout.json"
# The shipped copy: bfloat16 weights (half the size; loaded as float32 on the CPU).
python - "$OUTPUT_DIR" <<'PY'
import sys
import torch
from transformers import AutoTokenizer
from diffuapriel_hf import DiffuAprielForMaskedLM
folder = sys.argv[1]
model = DiffuAprielForMaskedLM.from_pretrained(f"{folder}/diffuapriel-8m", dtype=torch.bfloat16)
model.save_pretrained(f"{folder}/shipped")
AutoTokenizer.from_pretrained(f"{folder}/diffuapriel-8m").save_pretrained(f"{folder}/shipped")
PY
