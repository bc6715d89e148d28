"""What bounds the model FLOP utilisation of a diffuapriel-1.3b step: whole graphed steps (batch 1, bf16, random
weights) as built, and with parts of each Mamba mixer made free, alternating in one process on one GPU:

- "SSD free": the SSD call returns an uninitialised tensor of its output's shape (no kernel runs);
- "SSD, convolution and gated norm free": the convolution and the gated RMSNorm also return their input as it is.

The logits of the last two are meaningless; their times say what the step would take if those parts cost nothing,
and so the most MFU (2 x parameters x tokens / step time / the datasheet's dense bf16 peak) that making them faster
could reach with the rest (the matrix products on cuBLAS, the fused element-wise kernels) as it is.

    python benchmarks/mfu_bound.py --out benchmarks/results/mfu_bound.json
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from harness import build, device_name, graphed_step_ms, new_result, peak_bf16, save  # beside this script


def free_ssd(x, *args, **kwargs):
    return torch.empty_like(x)


def free_conv(x, weight, bias=None, activation=None):
    return x


def free_norm(x, weight, bias, z=None, **kwargs):
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384, 32768, 65536])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from diffuapriel_hf.modeling import mamba_ops
    from diffuapriel_hf.modeling.kernel_policy import override_kernel_policy

    model = build("diffuapriel-1.3b")
    kernels = mamba_ops.kernel_ops()
    variants = {
        "as built": kernels,
        "SSD free": dataclasses.replace(kernels, chunk_scan=free_ssd),
        "SSD, convolution and gated norm free": dataclasses.replace(
            kernels, chunk_scan=free_ssd, causal_conv1d=free_conv, rmsnorm=free_norm
        ),
    }
    parameters = model.num_parameters()
    peak = peak_bf16(device_name())
    result = new_result(parameters=parameters, peak_flops=peak, step_ms={}, mfu={})
    for length in args.lengths:
        ids = torch.randint(0, model.config.mask_token_id, (1, length), device="cuda")
        for _ in range(args.rounds):
            for name, ops in variants.items():
                with override_kernel_policy(mamba=ops):
                    ms = graphed_step_ms(model, ids, reps=5 if length > 16384 else 15, warmup=2)
                result["step_ms"].setdefault(f"1 x {length}: {name}", []).append(ms)
                print(f"1 x {length:6d}  {name:40s} {ms:8.2f} ms", flush=True)
        for name in variants:
            best = min(result["step_ms"][f"1 x {length}: {name}"])
            result["mfu"][f"1 x {length}: {name}"] = 2 * parameters * length / (best / 1e3) / peak
    save(result, args.out)
    print(json.dumps(result["mfu"], indent=1))


if __name__ == "__main__":
    main()
