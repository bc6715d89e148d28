"""One denoising step of the 1.3B block presets against an exact cache, as generate() runs it (its block alone,
replayed from a CUDA graph, after a prompt consumed into the cache), under variants of the kernel policy: the default,
the SSD on mamba-ssm's kernels throughout (`ssd_triton.single_pass_is_faster`'s short-sequence rule off), and the LM
head's vocabulary left unpadded (`KernelPolicy.vocab_multiple` 1). bf16, random weights, one GPU, one process.
With --training, a training step's forward and backward instead (the two-stream loss, half the tokens masked, no
optimizer), with the right-to-left direction reading each block as a document of the whole row (the default in
training) and as a row of its own (`KernelPolicy.block_documents`).

    python benchmarks/block_step.py --out benchmarks/results/block_step
    python benchmarks/block_step.py --training --out benchmarks/results/block_step_training
"""

import argparse

import torch

from diffuapriel_hf.modeling.cuda_graphs import release_graphs
from diffuapriel_hf.modeling.denoisers import ExactCacheDenoiser
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
from diffuapriel_hf.modeling.mamba_ops import kernel_ops
from diffuapriel_hf.modeling.presets import MAMBA

from harness import build, median_ms, new_result, rows_of_each_model  # benchmarks/harness.py, beside this script
from profile_step import training_step

MODELS = ["diffuapriel-1.3b-block", "diffuapriel-h-1.3b-block", "diffutran-1.3b-block"]
BATCHES = [1, 16]
CONTEXT = 8192
TRAINING_SHAPES = [(8, 1024), (2, 4096)]  # (batch, length): 8,192 noised tokens a step


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


def training_variants(model) -> dict:
    chosen = {"default": {}}
    if MAMBA in model.config.layer_types:
        chosen["blocks as rows"] = dict(block_documents=False)
    return chosen


def training_step_ms(model, batch: int, length: int) -> float:
    """The median forward and backward of the two-stream loss (half the tokens masked), gradients dropped after."""
    return median_ms(training_step(model, batch, length), reps=3, warmup=1)


def markdown(result: dict) -> str:
    names = list(dict.fromkeys(name for row in result["rows"] for name in row["step_ms"]))
    lines = ["| model | batch | length | " + " | ".join(f"{name} (ms)" for name in names) + " |",
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
    parser.add_argument("--training", action="store_true", help="a training step's forward and backward (see above)")
    args = parser.parse_args()
    result = new_result(context=args.context, training=args.training, rows=[])

    def rows(model, name):
        shapes = TRAINING_SHAPES if args.training else [(batch, args.context) for batch in BATCHES]
        for batch, length in shapes:
            row = dict(model=name, batch=batch, context=length, step_ms={})
            for variant, fields in (training_variants if args.training else variants)(model).items():
                with override_kernel_policy(**fields):
                    timed = training_step_ms if args.training else step_ms
                    row["step_ms"][variant] = timed(model, batch, length)
            yield row
    rows_of_each_model(result, args.out, args.models, build, rows, markdown)


if __name__ == "__main__":
    main()
