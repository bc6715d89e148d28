"""Whole diffuapriel-1.3b denoising steps (batch 1, bf16, replayed from CUDA graphs) as the model runs them, against two
ways of running the same kernels that could hide part of the step: the mixer's right-to-left direction on a second
CUDA stream (so that one direction's memory-bound kernels and SSD may overlap the other's matrix products), and
cuBLASLt instead of cuBLAS for every matrix product. Alternating in one process on one GPU, over several rounds; the
logits of each variant are compared with the model's.

    python benchmarks/step_variants.py --lengths 16384 65536 --out benchmarks/results/step_variants.json
"""

import argparse
from pathlib import Path

import torch

from diffuapriel_hf.modeling.cuda_graphs import GraphedDenoiser
from diffuapriel_hf.modeling.kernel_policy import REFERENCE_POLICY
from diffuapriel_hf.modeling.mamba_ops import reverse_time
from diffuapriel_hf.modeling.modeling_diffuapriel import BidirectionalMamba2Mixer
from harness import build, graphed_step_ms, new_result, save, sharing_weights  # benchmarks/, beside this script

_side_streams = {}


class TwoStreamMixer(BidirectionalMamba2Mixer):
    """The mixer with its right-to-left direction (its input reversal included) on a side CUDA stream, where it reads
    a whole unpadded sequence (as the benchmark's steps do); as built otherwise."""

    def direction_outputs(self, hidden_states, padding_mask=None, block_context=None, two_stream=False,
                          kernels=REFERENCE_POLICY):
        if (self.right_to_left is None or padding_mask is not None or block_context is not None
                or self.config.block_size is not None):
            return super().direction_outputs(hidden_states, padding_mask, block_context, two_stream, kernels)
        ops = kernels.mamba
        main = torch.cuda.current_stream()
        side = _side_streams.setdefault(hidden_states.device, torch.cuda.Stream(hidden_states.device))
        side.wait_stream(main)
        with torch.cuda.stream(side):
            right_to_left = self.right_to_left(reverse_time(hidden_states), None, ops)
        left_to_right = self.left_to_right(hidden_states, None, ops)
        main.wait_stream(side)  # every side-stream tensor is used or freed on the main stream after this
        return left_to_right, right_to_left


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384, 65536])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = build("diffuapriel-1.3b")
    # Each variant: the model it runs (the two-stream one shares the model's weights) and the BLAS library.
    variants = {"as built": (model, "cublas"),
                "directions on two streams": (sharing_weights(model, mixer_class=TwoStreamMixer), "cublas"),
                "cuBLASLt": (model, "cublaslt")}
    result = new_result(rounds=args.rounds, step_ms={}, max_abs_logit_difference={})
    for length in args.lengths:
        ids = torch.randint(0, model.config.mask_token_id, (1, length), device="cuda")
        logits = {}
        for name, (variant_model, blas) in variants.items():
            torch.backends.cuda.preferred_blas_library(blas)
            with torch.no_grad():
                logits[name] = GraphedDenoiser(variant_model, max_tokens=None)(ids)[0, :256].float()
            difference = (logits[name] - logits["as built"]).abs().max().item()
            result["max_abs_logit_difference"][f"1 x {length}: {name}"] = difference
        for _ in range(args.rounds):
            for name, (variant_model, blas) in variants.items():
                torch.backends.cuda.preferred_blas_library(blas)
                ms = graphed_step_ms(variant_model, ids, reps=5 if length > 16384 else 15, warmup=2)
                result["step_ms"].setdefault(f"1 x {length}: {name}", []).append(ms)
                print(f"1 x {length:6d}  {name:28s} {ms:8.2f} ms", flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    save(result, args.out)


if __name__ == "__main__":
    main()
