"""Long-context generation: block diffusion with the exact cache against full-sequence models, all in one run on one
GPU (the 1.3B presets, random weights, bf16, SDPA attention).

Each configuration generates 256 new tokens after a prompt of 1K to 64K tokens (and, for the block models, as far
beyond as memory allows: 128K, 256K), greedy, in blocks of 32, with 8 steps a block ("steps") and with the
confidence threshold 0.9 and `steps` unset ("threshold": Fast-dLLM's decoding; random weights are never that sure, so
it commits one token a step):
- block `diffuapriel-1.3b-block`, `diffuapriel-h-1.3b-block`, `diffutran-1.3b-block` with the exact cache (DiffuTran's
  is its keys and values, BD3-LM's form);
- full-sequence `diffuapriel-1.3b` and `diffuapriel-h-1.3b`, without a cache and with the approximate block cache
  (`use_block_cache`). Without a cache, the threshold's 256 whole-sequence passes are measured up to 4K tokens only.
Measured per configuration and shape: new tokens per second of `generate()` (one call; up to 16K tokens a batch, after
a warm-up call of the same shape that captures the CUDA graphs, beyond which a capture is a small part of the call),
the time to the first committed block (the prompt's prefill included), the peak GPU memory of the call, and the
denoising passes it took; for the block models at batch 1, also the time of one denoising step against the cache
(replayed from its CUDA graph, median of 20). Batch 1 at every length, batch 16 at 1K and 4K. A configuration whose call takes more than
SLOW_CALL_S seconds is not run at longer prompts.

    python benchmarks/long_context_generation.py --out benchmarks/results/long_context_generation
    python benchmarks/long_context_generation.py --render benchmarks/results/long_context_generation.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

from harness import build, median_ms, new_result, output_paths, save

from diffuapriel_hf.modeling.denoisers import ExactCacheDenoiser

BLOCK_MODELS = ["diffuapriel-1.3b-block", "diffuapriel-h-1.3b-block", "diffutran-1.3b-block"]
FULL_MODELS = ["diffuapriel-1.3b", "diffuapriel-h-1.3b"]
LENGTHS = [1024, 4096, 8192, 16384, 65536]  # 8K: where the issue wants block DiffuApriel ahead of block DiffuTran
BLOCK_ONLY_LENGTHS = [131072, 262144]
BATCHED = {1024: 16, 4096: 16}  # prompt length -> batch size of the batched shapes
NEW_TOKENS, BLOCK, STEPS_PER_BLOCK, THRESHOLD = 256, 32, 8, 0.9
NO_CACHE_THRESHOLD_MAX_LENGTH = 4096  # batch 1 only: its 256 whole-sequence passes cost minutes beyond
WARM_UP_MAX_TOKENS = 16384
SLOW_CALL_S = 60.0


class FirstBlockTimer:
    """A streamer that notes when the first generated block arrives (`put` receives tensors copied to the host, so
    the GPU has finished them)."""

    def __init__(self, start: float):
        self.start, self.puts, self.first_block_s = start, 0, None

    def put(self, tokens):
        self.puts += 1
        if self.puts == 2:  # the prompt comes first, then each block
            self.first_block_s = time.perf_counter() - self.start

    def end(self):
        pass


def settings(decoding: str, cache: str) -> dict:
    common = dict(max_new_tokens=NEW_TOKENS, block_length=BLOCK, eos_token_id=None, return_dict_in_generate=True,
                  use_cache=cache == "exact", use_block_cache=cache == "approximate")
    if decoding == "steps":
        return dict(common, steps=NEW_TOKENS // BLOCK * STEPS_PER_BLOCK)
    return dict(common, confidence_threshold=THRESHOLD)


def run_once(model, ids, config: dict) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    timer = FirstBlockTimer(start)
    output = model.generate(ids, streamer=timer, **config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, tokens_per_s=ids.shape[0] * NEW_TOKENS / seconds, first_block_s=timer.first_block_s,
                peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30, forward_passes=output.num_forward_passes)


def measure(model, batch: int, length: int, config: dict) -> dict:
    """A warm-up call (graphs, autotuning) of short shapes and one measured call; an out-of-memory error is recorded."""
    ids = torch.randint(0, model.config.mask_token_id, (batch, length), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    try:
        if batch * length <= WARM_UP_MAX_TOKENS:
            run_once(model, ids, config)
        return run_once(model, ids, config)
    except torch.OutOfMemoryError as error:
        return dict(error=f"out of memory: {str(error).splitlines()[0]}")
    finally:
        del ids
        torch.cuda.empty_cache()


def block_step_ms(model, length: int) -> dict:
    """The median time of one step of a block model against the exact cache of a `length`-token prompt."""
    canvas = torch.randint(0, model.config.mask_token_id, (1, length + BLOCK), device="cuda")
    denoiser = ExactCacheDenoiser(model, None, graphs=True)
    try:
        with torch.no_grad():
            denoiser.start_block(slice(length, length + BLOCK))
            denoiser(canvas)  # consumes the prompt, captures the step's graph
            return dict(step_ms=median_ms(lambda: denoiser(canvas), reps=20, warmup=2))
    except torch.OutOfMemoryError as error:
        return dict(step_error=f"out of memory: {str(error).splitlines()[0]}")
    finally:
        del canvas, denoiser
        torch.cuda.empty_cache()


def configurations(name: str, lengths: list[int], decodings: list[str]):
    """(cache, decoding, shapes) of one model, at those of `lengths` that it is measured at."""
    block = name.endswith("-block")
    lengths = [n for n in lengths if block or n not in BLOCK_ONLY_LENGTHS]
    shapes = [(1, n) for n in lengths] + [(batch, n) for n, batch in BATCHED.items() if n in lengths]
    for cache in (["exact"] if block else ["none", "approximate"]):
        for decoding in decodings:
            if (cache, decoding) == ("none", "threshold"):
                yield cache, decoding, [(b, n) for b, n in shapes if b == 1 and n <= NO_CACHE_THRESHOLD_MAX_LENGTH]
            else:
                yield cache, decoding, shapes


def run(names: list[str], lengths: list[int], decodings: list[str], result: dict, out: Path) -> None:
    """Measures every configuration of `names` into result["rows"], saving the result after each row (a run stopped
    by a time limit keeps what it measured)."""
    rows = result.setdefault("rows", [])
    for name in names:
        model = build(name, max_position_embeddings=max(LENGTHS + BLOCK_ONLY_LENGTHS) + NEW_TOKENS)
        for cache, decoding, shapes in configurations(name, lengths, decodings):
            slow_from = None  # the batch-1 length from which calls are too slow to go on
            for batch, length in shapes:
                row = dict(model=name, cache=cache, decoding=decoding, batch=batch, prompt_length=length)
                if slow_from is not None and batch == 1 and length > slow_from:
                    continue
                row.update(measure(model, batch, length, settings(decoding, cache)))
                if cache == "exact" and decoding == "steps" and batch == 1 and "error" not in row:
                    row.update(block_step_ms(model, length))
                if batch == 1 and ("error" in row or row["seconds"] > SLOW_CALL_S):
                    slow_from = length
                print(json.dumps(row), flush=True)
                rows.append(row)
                save(result, out, markdown=markdown(result))
        del model
        torch.cuda.empty_cache()


def label(row: dict) -> str:
    cache = f"{row['cache']} cache" if row["cache"] != "none" else "no cache"
    return f"{row['model']} ({cache}{', run ' + str(row['run']) if 'run' in row else ''})"


def markdown(result: dict) -> str:
    lines = ["| run | model | cache | decoding | batch | prompt | new tokens/s | first block (s) | peak GiB | passes | "
             "step (ms) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "error" in row:
            measured = f"{row['error'][:60]} | | | | |"
        else:
            step = f"{row['step_ms']:.2f}" if "step_ms" in row else ""
            measured = (f"{row['tokens_per_s']:,.0f} | {row['first_block_s']:.3f} | {row['peak_memory_gb']:.1f} | "
                        f"{row['forward_passes']} | {step} |")
        lines.append(f"| {row.get('run', '')} | {row['model']} | {row['cache']} | {row['decoding']} | {row['batch']} | "
                     f"{row['prompt_length']:,} | {measured}")
    return "\n".join(lines + ["", *result.get("findings", [])])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 5.5))
    curves = {}
    for row in result["rows"]:
        if row["batch"] == 1 and row["decoding"] == "steps" and "error" not in row:
            curves.setdefault((label(row), row["cache"]), []).append((row["prompt_length"], row["tokens_per_s"]))
    for index, ((name, cache), points) in enumerate(curves.items()):
        lengths, throughput = zip(*sorted(points))
        # Full-sequence models dashed: the block models' exact cache is what the plot compares them with.
        axis.plot(lengths, throughput, marker="o", label=name, color=plt.cm.tab20.colors[index % 20],
                  linestyle="-" if cache == "exact" else "--")
    axis.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="new tokens per second",
             title=f"256 new tokens, blocks of 32, 8 steps a block, batch 1 ({result['environment']['device']})")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="path stem of the .json and .md (and .png, with matplotlib)")
    parser.add_argument("--models", nargs="+", default=BLOCK_MODELS + FULL_MODELS)
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS + BLOCK_ONLY_LENGTHS,
                        help="prompt lengths (those beyond LENGTHS are measured on block models only)")
    parser.add_argument("--decodings", nargs="+", choices=["steps", "threshold"], default=["steps", "threshold"])
    parser.add_argument("--render", type=Path, help="rewrite the .md and .png of saved results instead of measuring")
    args = parser.parse_args()
    if args.render is not None:
        result = json.loads(args.render.read_text())
        save(result, args.render, markdown=markdown(result))
        plot(result, output_paths(args.render)[0].with_suffix(".png"))
        return
    if args.out is None:
        parser.error("--out is required unless --render is given")
    result = new_result(new_tokens=NEW_TOKENS, block=BLOCK, steps_per_block=STEPS_PER_BLOCK, threshold=THRESHOLD)
    run(args.models, args.lengths, args.decodings, result, args.out)


if __name__ == "__main__":
    main()
