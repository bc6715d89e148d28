"""What torch.compile buys `generate()`: the same calls on the same model, as it runs by default and compiled in place
(`model.compile()`, whose passes `generate()` runs through the compiled graph).

Completes held-out standard-library prompts (a fixed number of tokens each) with the shipped model (or --model),
greedily, in blocks, and records for each prompt length:
- the default call's time (the median of --repeats after a warm-up call; on CUDA its passes replay a CUDA graph);
- the first call of a copy compiled in place: its time (capture and code generation included, into an empty cache
  unless --compile_cache names one), then the median of --repeats calls, each right after a default one (on a
  shared machine, load then falls on both alike);
- the speed-up (the median of the pairs' ratios), whether the compiled call's tokens are the default call's, the
  forward passes of a call, and the machine's load average (1, 5, 15 minutes) when the row was done.

    python benchmarks/compile_generate.py --out benchmarks/results/compile_generate_cpu
    python benchmarks/compile_generate.py --device cuda --out benchmarks/results/compile_generate_gpu
"""

import argparse
import copy
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from block_cache import prompts, timed_generate  # benchmarks/block_cache.py, beside this script
from diffuapriel_hf import DiffuAprielForMaskedLM, default_model_path
from harness import new_result, save  # benchmarks/harness.py, beside this script


def measure(model, make_prompts, lengths: list[int], repeats: int, settings: dict, compile_options: dict) -> list:
    """One row per prompt length. The model and a copy compiled in place are called in turn, `repeats` times each
    after a warm-up, so that a change of the machine's load falls on both alike."""
    compiled_model = copy.deepcopy(model)
    compiled_model.compile(**compile_options)
    rows = []
    for length in lengths:
        ids = make_prompts(length)
        timed_generate(model, ids, **settings)  # warm-up: first-call costs, and on CUDA the graph's capture
        _, first_compiled_call = timed_generate(compiled_model, ids, **settings)  # capture and code generation
        times = {"default": [], "compiled": []}
        for _ in range(repeats):
            default, seconds = timed_generate(model, ids, **settings)
            times["default"].append(seconds)
            compiled, seconds = timed_generate(compiled_model, ids, **settings)
            times["compiled"].append(seconds)
        row = dict(prompt_tokens=length, default_seconds=statistics.median(times["default"]),
                   first_compiled_call_seconds=first_compiled_call,
                   compiled_seconds=statistics.median(times["compiled"]),
                   # the median of each pair's ratio: a pair ran under about the same load
                   speedup=statistics.median(d / c for d, c in zip(times["default"], times["compiled"])),
                   same_tokens=bool(torch.equal(compiled.sequences, default.sequences)),
                   forward_passes=int(default.num_forward_passes), times=times, load_average=os.getloadavg())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"# torch.compile and generate(): {Path(result['model']).name}, {result['environment']['device']}, "
        f"{result['dtype']}",
        "",
        f"Batch of {result['batch']} held-out standard-library prompts, {result['max_new_tokens']} new tokens in "
        f"blocks of {result['block_length']}, {result['steps']} steps (greedy, low-confidence remasking); "
        f"`model.compile({', '.join(f'{k}={v!r}' for k, v in result['compile_options'].items())})`. Medians of "
        f"{result['repeats']} calls each after a warm-up, the default and compiled calls in turn; the first compiled "
        "call includes the capture and code generation.",
        "",
        "| prompt tokens | default s | first compiled call s | compiled s | speed-up | same tokens | forward passes "
        "| load average |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['prompt_tokens']} | {row['default_seconds']:.3f} | "
                     f"{row['first_compiled_call_seconds']:.1f} | {row['compiled_seconds']:.3f} | "
                     f"{row['speedup']:.2f}x | {'yes' if row['same_tokens'] else 'no'} | {row['forward_passes']} | "
                     f"{', '.join(f'{load:.1f}' for load in row['load_average'])} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="path stem of the .json and .md to write")
    parser.add_argument("--model", default=None, help="model folder (default: the package's shipped model)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights' dtype (default: float32 on the CPU, bfloat16 elsewhere)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--prompt_lengths", nargs="+", type=int, default=[64, 448])
    parser.add_argument("--prompts", type=int, default=1, help="prompts per batch")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--block_length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: its default)")
    parser.add_argument("--compile_cache", default=None, help="torch.compile's cache folder (default: a new empty "
                        "one, so that the first compiled call compiles from scratch, as in a fresh environment)")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.compile_cache or tempfile.mkdtemp(prefix="compile_generate_")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    folder = args.model or str(default_model_path())
    model = DiffuAprielForMaskedLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lengths = dict(max_new_tokens=args.max_new_tokens, block_length=args.block_length, steps=args.steps)
    settings = dict(lengths, do_sample=False, return_dict_in_generate=True)
    compile_options = {} if args.mode is None else dict(mode=args.mode)
    result = new_result(model=folder, dtype=str(dtype), batch=args.prompts, repeats=args.repeats,
                        compile_options=compile_options, compile_cache=args.compile_cache or "new", **lengths)
    make_prompts = lambda length: prompts(tokenizer, args.prompts, length).to(device)  # noqa: E731
    result["rows"] = measure(model, make_prompts, args.prompt_lengths, args.repeats, settings, compile_options)
    save(result, args.out, markdown=markdown(result))


if __name__ == "__main__":
    main()
