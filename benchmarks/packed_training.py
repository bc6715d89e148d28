"""Padding-free packed training against padded batches, on a corpus of short documents: the top-level functions and
classes of the standard library's held-out modules, tokenized by the shipped tokenizer (most are 20 to 400 tokens).

Each step takes the same documents both ways: a padded batch (`DataCollatorForMaskedDiffusion(tokenizer)`, padded to
the batch's longest document) and one packed row (`padding_free=True`). The model trains on both (forward, backward,
AdamW step), alternating, and the script reports real tokens per second of each (median over the steps) and the share
of the padded batch that was padding. Same noise both ways (seeded examples), so the losses agree. On CUDA the
weights are bf16 and AdamW is fused, as `training_throughput.py` trains (a float32 model's products run in full float32
there, at a small fraction of the bf16 rate); on the CPU they are float32.

    python benchmarks/packed_training.py --out benchmarks/results/packed_training_cpu                 # CPU
    python benchmarks/packed_training.py --device cuda --preset diffuapriel-240m --out benchmarks/results/packed_training_gpu
    python benchmarks/packed_training.py --device cuda --preset diffuapriel-240m --batch 128 \
        --out benchmarks/results/packed_training_gpu_batch128

A small model's step on a few documents is bound by the host launching its kernels, whatever its tokens: on an H100,
16 documents a step of diffuapriel-240m took about 130 ms both ways, so packing showed nothing (0.98x); at 128
documents a step the GPU is the bound and packing pays for the padding it removes (2.02x at 50% padding).
"""

import argparse
import ast
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from harness import new_result, save

from diffuapriel_hf import DataCollatorForMaskedDiffusion, DiffuAprielForMaskedLM, preset_config
from diffuapriel_hf.training.stdlib_corpus import stdlib_files

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "diffuapriel_hf" / "default_model"


def short_documents(tokenizer, max_tokens: int) -> list[list[int]]:
    """The source of every top-level function and class of the held-out modules, tokenized, cut at max_tokens."""
    documents = []
    for path in stdlib_files("heldout"):
        source = path.read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                ids = tokenizer(ast.get_source_segment(source, node))["input_ids"][:max_tokens]
                documents.append(ids)
    return documents


def step_documents(documents: list, step: int, batch: int) -> list:
    """The `batch` documents of a step: the corpus read in order, from its start again after its end (every step
    takes `batch` documents, one that wraps around too)."""
    return [documents[(step * batch + i) % len(documents)] for i in range(batch)]


def timed_step(model, optimizer, batch, device) -> tuple[float, float]:
    """Seconds of one training step on `batch`, and its loss."""
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="path stem of the .json and .md to write")
    parser.add_argument("--preset", default="diffuapriel-8m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16, help="documents a step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max_tokens", type=int, default=512)
    args = parser.parse_args()
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    documents = short_documents(tokenizer, args.max_tokens)
    config = preset_config(args.preset, vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                           max_position_embeddings=args.max_tokens)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = DiffuAprielForMaskedLM(config).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    collators = {"padded": DataCollatorForMaskedDiffusion(tokenizer),
                 "packed": DataCollatorForMaskedDiffusion(tokenizer, padding_free=True)}
    result = new_result(preset=args.preset, device_argument=args.device, dtype=str(dtype).removeprefix("torch."),
                        batch=args.batch, steps=args.steps, documents=len(documents), max_tokens=args.max_tokens)
    seconds, padding_share, losses = {name: [] for name in collators}, [], {name: [] for name in collators}
    for step in range(args.steps + 1):  # the first step of each is a warm-up
        chosen = step_documents(documents, step, args.batch)
        examples = [{"input_ids": ids, "noise_seed": step * 1000 + i} for i, ids in enumerate(chosen)]
        real_tokens = sum(len(ids) for ids in chosen)
        for name, collator in collators.items():
            batch = collator(examples)
            if name == "padded":  # (B, longest document): what is not a document's token is padding
                padding_share.append(1 - real_tokens / batch["input_ids"].numel())
            took, loss = timed_step(model, optimizer, batch, device)
            if step:
                seconds[name].append(took)
                losses[name].append(loss)
        result.setdefault("real_tokens", []).append(real_tokens)
        # A line a step, so that a run cut short (the first steps compile the kernels) still says how far it got.
        timings = ", ".join(f"{name} {1e3 * took[-1]:.1f} ms" for name, took in seconds.items()) if step else "warm-up"
        print(f"step {step}: {real_tokens} real tokens, padding {padding_share[-1]:.0%}: {timings}", flush=True)
    tokens = statistics.median(result["real_tokens"])
    result["tokens_per_s"] = {name: tokens / statistics.median(times) for name, times in seconds.items()}
    result["padding_share"] = statistics.mean(padding_share)
    result["speedup"] = result["tokens_per_s"]["packed"] / result["tokens_per_s"]["padded"]
    result["seconds"], result["losses"] = seconds, losses
    table = (f"| layout | real tokens/s |\n|---|---|\n| padded | {result['tokens_per_s']['padded']:,.0f} |\n"
             f"| packed | {result['tokens_per_s']['packed']:,.0f} |\n\n{args.preset} ({result['dtype']}) on "
             f"{args.device}, {args.batch} documents a step (median {tokens:,.0f} real tokens), padding "
             f"{result['padding_share']:.0%} of the padded batches: packed rows train {result['speedup']:.2f}x as many "
             f"tokens per second.")
    save(result, args.out, markdown=table)
    print(table)


if __name__ == "__main__":
    main()
