#!/bin/bash
# Training throughput of the same train command on one GPU and on two (DDP, through `accelerate launch`, no
# distribution code of ours): diffuapriel-240m, bf16, 1,024-token sequences of the standard library, the shipped
# model's tokenizer. Run from the repository root; writes OUT_DIR/{1gpu,2gpu-ddp}.json (Trainer's train_results,
# stamped with the commit, device and library versions by benchmarks/harness.py).
set -euo pipefail
OUT_DIR=${1:?usage: train_throughput.sh OUT_DIR}
mapfile -t FILES < <(python -m diffuapriel_hf.training.stdlib_corpus train)
COMMON=(--train_files "${FILES[@]}" --preset diffuapriel-240m --vocab_size 4096
        --tokenizer src/diffuapriel_hf/default_model --seq_len 1024 --per_device_train_batch_size 8
        --warmup_steps 10 --logging_steps 10 --eval_fraction 0 --save_steps 100000 --bf16)
# One GPU is CUDA_VISIBLE_DEVICES=0: with two visible, Trainer would wrap a single process in nn.DataParallel.
# A few steps first, so that the measured runs find the Triton kernels compiled (TRITON_CACHE_DIR).
CUDA_VISIBLE_DEVICES=0 accelerate launch --num_processes 1 -m diffuapriel_hf.training.train "${COMMON[@]}" --max_steps 3 --output_dir /tmp/tp-warmup
CUDA_VISIBLE_DEVICES=0 accelerate launch --num_processes 1 -m diffuapriel_hf.training.train "${COMMON[@]}" --max_steps 80 --output_dir /tmp/tp-1gpu
accelerate launch --multi_gpu --num_processes 2 -m diffuapriel_hf.training.train "${COMMON[@]}" --max_steps 80 \
    --output_dir /tmp/tp-2gpu-ddp
cp /tmp/tp-1gpu/train_results.json "$OUT_DIR/1gpu.json"
cp /tmp/tp-2gpu-ddp/train_results.json "$OUT_DIR/2gpu-ddp.json"
python benchmarks/harness.py stamp "$OUT_DIR/1gpu.json" "$OUT_DIR/2gpu-ddp.json"
