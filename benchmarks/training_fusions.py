"""Training steps (forward with the loss, backward; no optimizer) of the 1.3B presets with training's fused paths
(the defaults) against each of them undone:
- the mixer's fused function: each Mamba direction from in_proj's output to out_proj's as mamba-ssm's
  `mamba_split_conv1d_scan_combined` (`MambaOps.split_conv1d_scan`), whose backward writes the gradient of in_proj's
  output in one buffer where the split's backward concatenates its parts, and recomputes the convolution; undone,
  the same kernels called one after another (`kernel_ops()`);
- the block's residual add + norm (with the direction sum) as one Triton kernel with a backward kernel
  (`fused_ops.AddRMSNorm`); undone, the PyTorch reference (`fused_elementwise=False`);
- for block models, the states entering each block through mamba-ssm's `state_passing` (a pass over the blocks)
  rather than through the reference's product with the blocks' decay matrix, in float32 (quadratic in the blocks);
- the MLP's gate and up as one product whose SwiGLU is one Triton kernel with a backward kernel
  (`fused_ops.SwiGLUOfProduct`, writing the product's gradient in one buffer); undone, inference's choice at these
  lengths: two products, the SwiGLU in PyTorch, the input's gradient the sum of the two products' gradients.
- the attention layers' rotary embedding of queries and keys as one Triton kernel, whose backward is the same kernel
  turning the other way (`fused_ops.Rotary`); undone, the PyTorch reference (`fused_rotary=False`: transformers' form,
  `x * cos + rotate_half(x) * sin`, several kernels and copies each way);
- the bidirectional mixer's two reading orders (the input and its reversed copy) as `fused_ops.BothReadingOrders`,
  whose backward adds the reversed direction's gradient to the other's in one kernel; undone, the reversal's own
  backward (a gather) and autograd's sum, two kernels (`fused_reading_orders=False`);
- the training pass: the mixer's function with its SSD forward by our single-pass kernel, which keeps the chunk
  states, and a backward from them and from the kept convolution output (`training_mixer.MixerTrainingPass`);
  undone ("mamba-ssm's mixer function"), mamba-ssm's `mamba_split_conv1d_scan_combined`, which recomputes both
  (`kernel_ops(split_conv1d_scan=True)`);
and a candidate not yet the default: the loss's -log p(label) by `loss_triton`'s two kernels ("token nll fused"),
where the default copies the logits to float32 for cross-entropy and its backward.
bf16, random weights, half the tokens masked, one GPU, one process; the variants alternate over rounds, and the
median of the rounds' medians counts. Also each variant's peak memory and loss.

    python benchmarks/training_fusions.py --out benchmarks/results/training_fusions
"""

import argparse
import dataclasses
from typing import Optional

import torch

from diffuapriel_hf.modeling import loss_triton
from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy
from diffuapriel_hf.modeling.mamba_ops import kernel_ops, state_passing_reference
from diffuapriel_hf.modeling.presets import ATTENTION, MAMBA

from harness import build, median_ms, new_result, rows_of_each_model  # benchmarks/harness.py, beside this script
from profile_step import training_step

SHAPES = {  # model: (batch, length) of each step
    "diffuapriel-1.3b": [(4, 4096), (1, 16384)],
    "diffutran-1.3b": [(4, 4096), (1, 16384)],
    "diffuapriel-1.3b-block": [(2, 4096)],
    "diffuapriel-h-1.3b": [(4, 4096)],
}


def variants(model) -> dict:
    """name: the policy fields it overrides (the mixer's only where the model has Mamba layers)."""
    chosen = {"default": {}, "residual norm unfused": dict(fused_elementwise=False),
              "token nll fused": dict(token_nll=loss_triton.token_nll)}
    if model.config.intermediate_size > 0:
        chosen["SwiGLU unfused"] = dict(fused_swiglu=False, mlp_one_product_min_tokens=None)
    if ATTENTION in model.config.layer_types:
        chosen["rotary unfused"] = dict(fused_rotary=False)
    if MAMBA in model.config.layer_types:
        chosen["mixer step by step"] = dict(mamba=kernel_ops())
        chosen["mamba-ssm's mixer function"] = dict(mamba=kernel_ops(split_conv1d_scan=True))
        chosen["reading orders unfused"] = dict(fused_reading_orders=False)
        if model.config.block_size is not None:
            default = kernel_ops(split_conv1d_scan=True, training_pass=True)
            dense = dataclasses.replace(default, state_passing=state_passing_reference)
            chosen["state passing dense"] = dict(mamba=dense)
    return chosen


def measure(model, batch: int, length: int, rounds: int, names: Optional[list] = None) -> dict:
    """{variant: dict(step_ms (the median over rounds of each round's median), rounds_ms, peak_gib, loss)}: the
    default and the variants `names` (default: all the model has)."""
    unknown = set(names or []) - set(variants(model))
    if unknown:
        raise ValueError(f"no variants {sorted(unknown)} for {model.config.name_or_path or 'this model'}: "
                         f"{sorted(variants(model))}")
    losses = []
    step = training_step(model, batch, length, losses)
    chosen = {name: fields for name, fields in variants(model).items()
              if names is None or name == "default" or name in names}
    found = {name: dict(rounds_ms=[]) for name in chosen}
    for round_index in range(rounds):
        for name, fields in chosen.items():
            with override_kernel_policy(**fields):
                torch.cuda.reset_peak_memory_stats()
                found[name]["rounds_ms"].append(median_ms(step, reps=3, warmup=1 if round_index == 0 else 0))
                found[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                found[name]["loss"] = losses[-1].item()
    for entry in found.values():
        entry["step_ms"] = sorted(entry["rounds_ms"])[len(entry["rounds_ms"]) // 2]
    return found


def markdown(result: dict) -> str:
    """Each variant's step (and its time over the default's), peak memory and loss."""
    names = list(dict.fromkeys(name for row in result["rows"] for name in row["variants"]))
    lines = ["| model | batch x length | " + " | ".join(f"{name}: ms (x default), GiB, loss" for name in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in result["rows"]:
        default = row["variants"]["default"]["step_ms"]
        cells = []
        for name in names:
            v = row["variants"].get(name)
            cells.append("" if v is None else
                         f"{v['step_ms']:.1f} ({v['step_ms'] / default:.3f}x), {v['peak_gib']:.1f}, {v['loss']:.5f}")
        lines.append(f"| {row['model']} | {row['batch']} x {row['length']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path stem of the .json and .md")
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", nargs="+", type=int, help="only the shapes of these lengths (default: all)")
    parser.add_argument("--variants", nargs="+", help="only the default and these variants, by name (default: all)")
    args = parser.parse_args()
    if kernel_ops() is None:
        raise SystemExit("needs a CUDA GPU with mamba-ssm")
    result = new_result(rounds=args.rounds, rows=[])

    def rows(model, name):
        for batch, length in SHAPES[name]:
            if not args.lengths or length in args.lengths:
                yield dict(model=name, batch=batch, length=length,
                           variants=measure(model, batch, length, args.rounds, args.variants))
    rows_of_each_model(result, args.out, args.models, lambda name: build(name).train(), rows, markdown)


if __name__ == "__main__":
    main()
