"""The matrix products of a diffuapriel-1.3b step at 64K tokens, each timed alone (bf16, `F.linear` as the model calls
it), against fused or padded variants: where the 140 GEMMs of a step lose to the card's ceiling, and whether
concatenating weights (SwiGLU's gate and up, both directions' in_proj or out_proj) or padding an output width would
help. Each product also through cuBLASLt, and with --triton through the best of Inductor's Triton matmul templates
(persistent TMA kernels included), autotuned for the shape by `torch.compile(mode="max-autotune-no-cudagraphs")`.

    python benchmarks/gemm_shapes.py --triton --out benchmarks/results/gemm_shapes.json
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import matmul_ceiling, median_ms, new_result, save  # benchmarks/harness.py, beside this script

TOKENS = 65536
# name: (input width K, output width N, calls per step)
SHAPES = {
    "in_proj (one direction)": (2048, 8512, 40),
    "in_proj, output padded to a multiple of 128": (2048, 8576, 0),
    "in_proj, both directions in one product": (2048, 17024, 0),
    "out_proj": (4096, 2048, 40),
    "out_proj, both directions in one product (inputs side by side)": (8192, 2048, 0),
    "SwiGLU gate or up": (2048, 2048, 40),
    "SwiGLU gate and up in one product": (2048, 4096, 0),
    "SwiGLU down": (2048, 2048, 20),
    "LM head (vocabulary padded to 50264)": (2048, 50264, 1),
    "LM head, vocabulary padded to 50304 (a multiple of 128)": (2048, 50304, 0),
}


def triton_autotuned_ms(x, weight) -> float:
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "TRITON"
    inductor_config.triton.enable_persistent_tma_matmul = True
    linear = torch.compile(lambda a, b: F.linear(a, b), mode="max-autotune-no-cudagraphs", dynamic=False)
    ms = median_ms(lambda: linear(x, weight), reps=20, warmup=3)
    torch._dynamo.reset()
    return ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--triton", action="store_true", help="also time Inductor's autotuned Triton matmuls")
    args = parser.parse_args()
    result = new_result(tokens=TOKENS)
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    ceiling = matmul_ceiling()  # FLOP/s
    rows = []
    with torch.no_grad():
        for name, (k, n, calls) in SHAPES.items():
            x, weight = torch.randn(TOKENS, k, **bf16), torch.randn(n, k, **bf16)
            ms = median_ms(lambda: F.linear(x, weight), reps=20, warmup=3)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            cublaslt_ms = median_ms(lambda: F.linear(x, weight), reps=20, warmup=3)
            torch.backends.cuda.preferred_blas_library("cublas")
            rows.append(dict(gemm=name, k=k, n=n, calls_per_step=calls, ms=ms,
                             tflops=2 * TOKENS * k * n / ms / 1e9, cublaslt_ms=cublaslt_ms))
            if args.triton:
                rows[-1]["triton_autotuned_ms"] = triton_autotuned_ms(x, weight)
            others = {key: round(value, 3) for key, value in rows[-1].items() if key.endswith("_ms")}
            print(f"{name:45s} {k:5d} x {n:6d}: {ms:7.3f} ms, {rows[-1]['tflops']:5.0f} TFLOP/s {others}", flush=True)
            del x, weight
    step_ms = sum(row["ms"] * row["calls_per_step"] for row in rows)
    print(f"ceiling {ceiling / 1e12:.0f} TFLOP/s; the step's GEMMs {step_ms:.1f} ms")
    result.update(ceiling_tflops=ceiling / 1e12, step_gemm_ms=step_ms, rows=rows)
    save(result, args.out)


if __name__ == "__main__":
    main()
