"""What the block cache (`use_block_cache`) buys and what it changes, with a trained model.

Completes held-out standard-library files (prompts of a fixed number of tokens) with the default model (or
--model), in semi-autoregressive blocks with several denoising steps each, greedily, with and without the cache, and
records, for each prompt length:
- the wall time of each `generate()` call and the speed-up;
- how many of the generated tokens the cache changed, and how many completions it left identical.

    python benchmarks/block_cache.py --out benchmarks/results/block_cache_cpu   # writes .json and .md

With --preset, a model of that preset with random weights (bf16 on CUDA) completes random prompts instead: the speed
at the lengths and sizes where the cache is meant to pay (its changes to random-weight outputs say little).

    python benchmarks/block_cache.py --preset diffuapriel-1.3b --prompts 1 --prompt_lengths 4096 16384 \
        --max_new_tokens 256 --block_length 32 --steps 64 --out benchmarks/results/block_cache_gpu_1.3b
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from diffuapriel_hf import DiffuAprielForMaskedLM, default_model_path, preset_config
from diffuapriel_hf.modeling.cuda_graphs import graphed_denoiser
from diffuapriel_hf.training.stdlib_corpus import stdlib_files
from harness import new_result, save  # benchmarks/harness.py, beside this script


def prompts(tokenizer, count: int, length: int) -> torch.Tensor:
    """The first `length` tokens of the first `count` held-out files that have that many."""
    rows = []
    for path in stdlib_files("heldout"):
        ids = tokenizer(path.read_text(encoding="utf-8")).input_ids
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == count:
            return torch.tensor(rows)
    raise ValueError(f"fewer than {count} held-out files have {length} tokens")


def timed_generate(model, ids, **settings):
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, **settings)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def eager_window_generate(model, ids, **settings):
    """`timed_generate` with the block cache, its window passes run eagerly: the model's `GraphedDenoiser` runs passes
    of more than `max_tokens` tokens eagerly (a block's first pass, over the whole sequence, is eager anyway)."""
    denoiser = graphed_denoiser(model)
    max_tokens, denoiser.max_tokens = denoiser.max_tokens, 0
    try:
        return timed_generate(model, ids, use_block_cache=True, **settings)
    finally:
        denoiser.max_tokens = max_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="path stem of the .json and .md to write")
    parser.add_argument("--model", default=None, help="model folder (default: the package's default model)")
    parser.add_argument("--preset", default=None, help="a preset with random weights and random prompts instead")
    parser.add_argument("--prompt_lengths", nargs="+", type=int, default=[192, 448, 960])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--block_length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.preset is None:
        folder = args.model or str(default_model_path())
        model = DiffuAprielForMaskedLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        make_prompts = lambda length: prompts(tokenizer, args.prompts, length)  # noqa: E731
    else:
        folder = args.preset
        config = preset_config(args.preset, max_position_embeddings=max(args.prompt_lengths) + args.max_new_tokens)
        torch.manual_seed(0)
        with torch.device(device):
            model = DiffuAprielForMaskedLM(config).to(dtype).eval()
        make_prompts = lambda length: torch.randint(0, config.mask_token_id, (args.prompts, length))  # noqa: E731
    settings = dict(max_new_tokens=args.max_new_tokens, block_length=args.block_length, steps=args.steps,
                    do_sample=False)
    result = new_result(model=folder, dtype=str(dtype), batch=args.prompts, **settings, rows=[])
    for length in args.prompt_lengths:
        ids = make_prompts(length).to(device)
        # Each path warmed up right before it is timed (Triton's first compilations; on CUDA the whole pass's graph,
        # which a model holds one of at a time, and the window's first pass): a repeated call, as in a service.
        model.generate(ids, **settings)
        plain, plain_s = timed_generate(model, ids, **settings)
        model.generate(ids, use_block_cache=True, **settings)
        cached, cached_s = timed_generate(model, ids, use_block_cache=True, **settings)
        new_plain, new_cached = plain[:, length:], cached[:, length:]
        row = dict(prompt_tokens=length, plain_seconds=plain_s, cached_seconds=cached_s, speedup=plain_s / cached_s,
                   changed_token_fraction=(new_plain != new_cached).float().mean().item(),
                   identical_completions=int((new_plain == new_cached).all(dim=-1).sum()))
        if device == "cuda":  # what the window passes' CUDA graphs buy: the same call with them run eagerly
            eager_windows, row["cached_eager_windows_seconds"] = eager_window_generate(model, ids, **settings)
            row["eager_windows_same_tokens"] = bool(torch.equal(eager_windows, cached))
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    what_prompts = "held-out standard-library prompts" if args.preset is None else "random prompts, random weights"
    lines = [
        f"# Block cache: {Path(folder).name}, {result['environment']['device']}, {dtype}",
        "",
        f"Batch of {args.prompts} {what_prompts}, {args.max_new_tokens} new tokens in blocks of {args.block_length}, "
        f"{args.steps} steps (greedy, low-confidence remasking); one `generate()` call each way after a warm-up of "
        "each.",
        "",
        "| prompt tokens | without cache s | with cache s | speed-up | generated tokens changed "
        "| identical completions |" + (" with cache, window passes eager s |" if device == "cuda" else ""),
        "|---|---|---|---|---|---|" + ("---|" if device == "cuda" else ""),
    ]
    for row in result["rows"]:
        eager_windows = f" {row['cached_eager_windows_seconds']:.2f} |" if device == "cuda" else ""
        lines.append(f"| {row['prompt_tokens']} | {row['plain_seconds']:.2f} | {row['cached_seconds']:.2f} | "
                     f"{row['speedup']:.2f}x | {row['changed_token_fraction']:.1%} | "
                     f"{row['identical_completions']} of {args.prompts} |{eager_windows}")
    save(result, args.out, markdown="\n".join(lines))


if __name__ == "__main__":
    main()
