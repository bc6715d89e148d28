"""Whole diffuapriel-1.3b denoising steps (batch 1, bf16, replayed from CUDA graphs) with and without the fused
operations of `diffuapriel_hf.modeling.fused_ops` and the MLP's one gate-and-up product, alternating in one process on
one GPU, over several rounds: what each is worth where it counts, in the step the throughput benchmark measures.

    python benchmarks/fusion_ab.py --lengths 4096 16384 65536 --out benchmarks/results/fusion_ab.json
"""

import argparse
from pathlib import Path

import torch

from harness import build, graphed_step_ms, new_result, save  # benchmarks/harness.py, beside this script

# name: (fused kernels on, MLP gate and up as one product from ONE_PRODUCT_MIN_TOKENS on, the SwiGLU kernel on)
CONFIGS = {
    "all fused": (True, True, True),
    "no one-product MLP": (True, False, True),
    "no SwiGLU kernel": (True, True, False),
    "no fused kernels, one-product MLP": (False, True, False),
    "nothing fused": (False, False, False),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from diffuapriel_hf.modeling.kernel_policy import DISPATCH_THRESHOLDS, override_kernel_policy

    model = build("diffuapriel-1.3b")
    one_product_from = DISPATCH_THRESHOLDS["mlp_one_product_min_tokens"].value
    result = new_result(rounds=args.rounds, step_ms={})
    for length in args.lengths:
        ids = torch.randint(0, model.config.mask_token_id, (1, length), device="cuda")
        for _ in range(args.rounds):
            for name in args.configs:
                kernels_on, one_product_on, swiglu_on = CONFIGS[name]
                with override_kernel_policy(fused_elementwise=kernels_on, fused_swiglu=swiglu_on,
                                            mlp_one_product_min_tokens=one_product_from if one_product_on else None):
                    ms = graphed_step_ms(model, ids, reps=5 if length > 16384 else 15, warmup=2)
                result["step_ms"].setdefault(f"1 x {length}: {name}", []).append(ms)
                print(f"1 x {length:6d}  {name:35s} {ms:8.2f} ms", flush=True)
    save(result, args.out)


if __name__ == "__main__":
    main()
