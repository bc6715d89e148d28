"""One denoising step of the 1.3B block presets against an exact cache, as generate() runs it (its block alone,
replayed from a CUDA graph, after a prompt consumed into the cache), under variants of the kernel policy: the default,
the SSD on mamba-ssm's kernels throughout (`ssd_triton.single_pass_is_faster`'s short-sequence rule off), and the LM
head's vocabulary left unpadded (`KernelPolicy.vocab_multiple` 1). bf16, random weights, one GPU, one process.

    python benchmarks/block_step.py --out benchmarks/results/block_step
"""

import argparse

import torch

from diffuapriel_hf.modeling.cuda_graphs import release_graphs
from diffuapriel_hf.modeling.denoisers import ExactCacheDenoiser
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
from diffuapriel_hf.modeling.mamba_ops import kernel_ops
from diffuapriel_hf.modeling.presets import MAMBA

from harness import build, median_ms, new_result, save  # benchmarks/harness.py, beside this script

MODELS = ["diffuapriel-1.3b-block", "diffuapriel-h-1.3b-block", "diffutran-1.3b-block"]
BATCHES = [1, 16]
CONTEXT = 8192


def variants(model) -> dict:
    """name: the policy fields it overrides (the SSD variant only where the model has Mamba layers)."""
    chosen = {"default": {}, "vocabulary unpadded": dict(vocab_multiple=1)}
    if MAMBA in model.config.layer_types:
        chosen["SSD on mamba-ssm"] = dict(mamba=kernel_ops(single_pass=False))
    return chosen


def step_ms(model, batch: int, context: int) -> float:
    """The median graphed step after `context` tokens (the first call consumes them and captures the graph)."""
    block = model.config.block_size
    ids = torch.randint(0, model.config.mask_token_id, (batch, context + block), device="cuda")
    denoiser = ExactCacheDenoiser(model, attention_mask=None, graphs=True)
    denoiser.start_block(slice(context, context + block))
    with torch.no_grad():
        ms = median_ms(lambda: denoiser(ids), reps=20, warmup=2)
    release_graphs(model)  # the graph holds the policy it was captured with
    return ms


def markdown(result: dict) -> str:
    names = list(dict.fromkeys(name for row in result["rows"] for name in row["step_ms"]))
    lines = ["| model | batch | context | " + " | ".join(f"{name} (ms)" for name in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for row in result["rows"]:
        cells = [f"{row['step_ms'][name]:.3f}" if name in row["step_ms"] else "" for name in names]
        lines.append(f"| {row['model']} | {row['batch']} | {row['context']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path stem of the .json and .md")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--context", type=int, default=CONTEXT)
    args = parser.parse_args()
    result = new_result(context=args.context, rows=[])
    for name in args.models:
        model = build(name)
        for batch in BATCHES:
            row = dict(model=name, batch=batch, context=args.context, step_ms={})
            for variant, fields in variants(model).items():
                with override_kernel_policy(**fields):
                    row["step_ms"][variant] = step_ms(model, batch, args.context)
            result["rows"].append(row)
            print(row, flush=True)
            save(result, args.out, markdown=markdown(result))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
