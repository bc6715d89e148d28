"""Inference throughput of DiffuApriel, DiffuApriel-H and DiffuTran (the 1.3B presets, random weights, bf16), all in
one run on one GPU.

For each model and each shape (batch 1 at 1K..64K tokens, and a fixed number of tokens per batch at short lengths)
it measures:
- the time of one denoising step (a full forward pass to the logits), launched eagerly and replayed from a CUDA
  graph (as `generate()` runs its steps up to 16K tokens; `diffuapriel_hf.modeling.cuda_graphs`), median of several runs
  with CUDA events; the step time is the faster of the two (the graph's replay also copies the logits out);
- the end-to-end throughput of `model.generate()` for a fixed number of denoising steps (new tokens per second,
  prompt of 64 tokens, one block, greedy), on a second call of the shape (the first, also recorded, captures the
  step's CUDA graph);
- the peak GPU memory of one eager step;
- model FLOP utilisation: 2 x parameters x tokens / step time / the card's dense bf16 peak (datasheet).
Attention runs on the fastest SDPA backend of those that run on the card (flash, cuDNN), picked per shape by timing
each, and the table says which.

    python benchmarks/throughput.py --out benchmarks/results/throughput        # writes .json, .md and .png
    python benchmarks/throughput.py --render benchmarks/results/throughput.json  # table and plot from saved results
"""

import argparse
import json
from pathlib import Path

import torch

from harness import (build, device_name, graphed_step_ms, matmul_ceiling, median_ms, new_result, peak_bf16, save,
                     wall_seconds)

MODELS = ["diffuapriel-1.3b", "diffuapriel-h-1.3b", "diffutran-1.3b"]
BASELINE = "diffutran-1.3b"
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
TOKENS_PER_BATCH = 16384  # the batched shapes: TOKENS_PER_BATCH // length sequences at each length below it
PROMPT_LENGTH = 64


def sdpa_backends(model):
    """The SDPA backends to try: flash and cuDNN for a model with attention layers (memory-efficient and math attention
    were slower at every length tried), None (nothing to choose) for a pure Mamba stack."""
    from torch.nn.attention import SDPBackend

    from diffuapriel_hf.modeling.configuration_diffuapriel import ATTENTION

    if ATTENTION not in model.config.layer_types:
        return [None]
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]


def backend_context(backend):
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    return nullcontext() if backend is None else sdpa_kernel([backend])


def measure(model, batch: int, length: int, steps: int, reps: int) -> dict:
    from diffuapriel_hf.modeling.cuda_graphs import release_graphs

    ids = torch.randint(0, model.config.mask_token_id, (batch, length), device="cuda")
    row = dict(batch=batch, length=length, tokens=batch * length)
    eager_ms, failures = {}, {}
    with torch.no_grad():
        for backend in sdpa_backends(model):
            name = "none" if backend is None else backend.name.lower()
            try:
                with backend_context(backend):
                    eager_ms[name] = median_ms(lambda: model(ids), reps=reps)
            except RuntimeError as error:  # a backend that does not run this shape on this card
                failures[name] = str(error).splitlines()[0][:200]
        if not eager_ms:
            raise RuntimeError(f"no attention backend ran batch {batch} x {length}: {failures}")
        best = min(eager_ms, key=eager_ms.get)
        backend = next(b for b in sdpa_backends(model) if ("none" if b is None else b.name.lower()) == best)
        row.update(attention_backend=best, eager_ms_by_backend=eager_ms, backend_failures=failures,
                   eager_step_ms=eager_ms[best])
        with backend_context(backend):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            model(ids)
            torch.cuda.synchronize()
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["graphed_step_ms"] = graphed_step_ms(model, ids, reps)

            prompt = ids[:, :PROMPT_LENGTH]
            outputs = []
            # The first call captures the step's graph, the second reuses it.
            seconds = wall_seconds(lambda: outputs.append(model.generate(
                input_ids=prompt, max_new_tokens=length - PROMPT_LENGTH, steps=steps, do_sample=False,
                return_dict_in_generate=True)), reps=2, warmup=0)
            out = outputs[-1]
            release_graphs(model)
    row.update(generate_steps=steps, generate_forward_passes=out.num_forward_passes,
               generate_first_call_seconds=seconds[0], generate_seconds=seconds[1],
               generate_tokens_per_s=batch * (length - PROMPT_LENGTH) / seconds[1])
    del out
    torch.cuda.empty_cache()
    return row


def run(args) -> dict:
    from diffuapriel_hf.modeling.cuda_graphs import GRAPH_MAX_TOKENS

    result = new_result(peak_bf16_flops=peak_bf16(device_name()), graph_max_tokens=GRAPH_MAX_TOKENS,
                        matmul_ceiling_flops=matmul_ceiling(), generate_steps=args.steps, prompt_length=PROMPT_LENGTH,
                        tokens_per_batch=TOKENS_PER_BATCH, models={})
    shapes = [(1, length) for length in args.lengths]
    shapes += [(TOKENS_PER_BATCH // length, length) for length in args.lengths if length < TOKENS_PER_BATCH]
    for name in args.models:
        model = build(name, max_position_embeddings=max(args.lengths))
        params = model.num_parameters()
        rows = []
        for batch, length in shapes:
            reps = 3 if batch * length >= 32768 else 10
            row = measure(model, batch, length, args.steps, reps)
            add_step_rates(row, params, result["peak_bf16_flops"])
            rows.append(row)
            print(f"{name:20s} {batch:3d} x {length:6d}  eager {row['eager_step_ms']:9.2f} ms  graphed "
                  f"{row['graphed_step_ms']:9.2f} ms  MFU {row['mfu']:5.1%}  "
                  f"gen {row['generate_tokens_per_s']:9.0f} tok/s  peak {row['peak_memory_gib']:5.1f} GiB  "
                  f"attn {row['attention_backend']}", flush=True)
        result["models"][name] = dict(parameters=params, rows=rows)
        save(result, args.out)  # what is measured so far survives a crash
        del model
        torch.cuda.empty_cache()
    return result


def add_step_rates(row, params, peak_flops):
    """The step time (the faster of eager and graphed), its model FLOP/s and MFU, into `row`."""
    row["step_ms"] = min(row["eager_step_ms"], row["graphed_step_ms"])
    flops = 2 * params * row["tokens"]
    row["model_tflops_per_s"] = flops / (row["step_ms"] / 1e3) / 1e12
    row["mfu"] = flops / (row["step_ms"] / 1e3) / peak_flops


def by_shape(result, name):
    return {(r["batch"], r["length"]): r for r in result["models"][name]["rows"]}


def targets(result) -> list[str]:
    """The targets, checked against this run: the paper's speed-ups over DiffuTran at 64K (4.4x, 2.6x for the hybrid),
    ahead of DiffuTran from 4K tokens, a 2K step within 1.5x of the time its FLOPs need at the 16K rate, 55% MFU."""
    lines = []
    base = by_shape(result, BASELINE)
    for name, needed in (("diffuapriel-1.3b", 4.4), ("diffuapriel-h-1.3b", 2.6)):
        if name not in result["models"] or (1, 65536) not in base:
            continue
        ours = by_shape(result, name)
        ratio = base[(1, 65536)]["step_ms"] / ours[(1, 65536)]["step_ms"]
        lines.append(f"- {name} step throughput at 64K = {ratio:.2f}x DiffuTran (target >= {needed}x): "
                     f"{'met' if ratio >= needed else 'missed'}")
    if "diffuapriel-1.3b" in result["models"]:
        ours = by_shape(result, "diffuapriel-1.3b")
        behind = [length for (batch, length), r in ours.items() if batch == 1 and length >= 4096
                  and r["step_ms"] >= base[(1, length)]["step_ms"]]
        verdict = "met" if not behind else f"missed at {behind}"
        lines.append(f"- diffuapriel-1.3b ahead of DiffuTran from 4K on: {verdict}")
        if (1, 16384) in ours and (1, 2048) in ours:
            rate16 = ours[(1, 16384)]["model_tflops_per_s"]
            needed_ms = 2 * result["models"]["diffuapriel-1.3b"]["parameters"] * 2048 / (rate16 * 1e12) * 1e3
            got = ours[(1, 2048)]["step_ms"]
            lines.append(f"- 2K step {got:.2f} ms vs {needed_ms:.2f} ms its FLOPs need at the 16K rate "
                         f"({rate16:.0f} TFLOP/s): {got / needed_ms:.2f}x (target <= 1.5x): "
                         f"{'met' if got <= 1.5 * needed_ms else 'missed'}")
        long = [r["mfu"] for (batch, length), r in ours.items() if batch == 1 and length >= 16384]
        if long:
            lines.append(f"- diffuapriel-1.3b MFU at >= 16K tokens: {min(long):.1%} to {max(long):.1%} of the "
                         f"{result['peak_bf16_flops'] / 1e12:.0f} TFLOP/s datasheet peak (target >= 55%): "
                         f"{'met' if min(long) >= 0.55 else 'missed'}")
    return lines


def markdown(result) -> str:
    base = by_shape(result, BASELINE)
    peak, ceiling = result["peak_bf16_flops"] / 1e12, result["matmul_ceiling_flops"] / 1e12
    lines = [
        f"# Throughput: {', '.join(result['models'])}",
        "",
        f"GPU: {result['environment']['device']}. bf16, random weights. Step = one denoising forward pass "
        f"to the logits, launched eagerly or replayed from a CUDA graph (which also copies the logits out); the "
        f"step time used below is the faster of the two (`generate()` replays graphs for steps of up to "
        f"{result['graph_max_tokens']} tokens). MFU = 2 x parameters x tokens / step time / {peak:.0f} TFLOP/s "
        f"(the datasheet's dense bf16 peak; an 8192^3 bf16 matmul reached {ceiling:.0f} TFLOP/s on this card). "
        f"Generation: `model.generate()` with {result['generate_steps']} denoising steps, a "
        f"{result['prompt_length']}-token prompt and one block, new tokens per second of a second call (the first "
        f"captures the step's graph). Ratios: DiffuTran's time over the model's.",
        "",
        "| model | batch x length | eager step ms | graphed step ms | step ratio vs DiffuTran | MFU | "
        "generate tok/s | generate ratio | peak GiB | attention |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["models"].items():
        for r in entry["rows"]:
            b = base.get((r["batch"], r["length"]))
            step_ratio = f"{b['step_ms'] / r['step_ms']:.2f}x" if b else "-"
            gen_ratio = f"{r['generate_tokens_per_s'] / b['generate_tokens_per_s']:.2f}x" if b else "-"
            lines.append(
                f"| {name} | {r['batch']} x {r['length']} | {r['eager_step_ms']:.2f} | {r['graphed_step_ms']:.2f} | "
                f"{step_ratio} | {r['mfu']:.1%} | {r['generate_tokens_per_s']:,.0f} | {gen_ratio} | "
                f"{r['peak_memory_gib']:.1f} | {r['attention_backend']} |")
    lines += ["", "## Targets", "", *targets(result), ""]
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = by_shape(result, BASELINE)
    for name in result["models"]:
        rows = sorted((r for r in result["models"][name]["rows"] if r["batch"] == 1), key=lambda r: r["length"])
        lengths = [r["length"] for r in rows]
        left.plot(lengths, [r["step_ms"] for r in rows], marker="o", label=name)
        right.plot(lengths, [base[(1, n)]["step_ms"] / r["step_ms"] for n, r in zip(lengths, rows)],
                   marker="o", label=name)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length (tokens, batch 1)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    left.set_yscale("log")
    left.set_ylabel("one denoising step (ms)")
    right.set_ylabel("throughput / DiffuTran's")
    fig.suptitle(f"bf16, 1.3B presets, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(result, out: Path):
    """OUT.json, OUT.md and OUT.png."""
    json_path = save(result, out, markdown=markdown(result))
    plot(result, json_path.with_suffix(".png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="path stem of the .json, .md and .png to write")
    parser.add_argument("--render", type=Path, help="rewrite the .md and .png of saved results instead of measuring")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps of each generate() call")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        if "environment" not in result:
            parser.error(f"{args.render} was recorded before results were stamped (benchmarks/harness.py): "
                         "measure again")
        write(result, args.render)
        return
    if args.out is None:
        parser.error("give --out (or --render)")
    if BASELINE not in args.models:
        parser.error(f"the ratios need the baseline {BASELINE} among --models")
    result = run(args)
    write(result, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
