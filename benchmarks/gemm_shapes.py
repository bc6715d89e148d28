"""The matrix products of a diffuapriel-1.3b step at 64K tokens, each timed alone (bf16, `F.linear` as the model calls
it), against fused or padded variants: where the 140 GEMMs of a step lose to the card's ceiling, and whether
concatenating weights (SwiGLU's gate and up, both directions' in_proj) or padding an output width would help.

    python benchmarks/gemm_shapes.py --out benchmarks/results/gemm_shapes.json
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from throughput import matmul_ceiling, median_ms  # benchmarks/throughput.py, beside this script

TOKENS = 65536
# name: (input width K, output width N, calls per step)
SHAPES = {
    "in_proj (one direction)": (2048, 8512, 40),
    "in_proj, output padded to a multiple of 128": (2048, 8576, 0),
    "in_proj, both directions in one product": (2048, 17024, 0),
    "out_proj": (4096, 2048, 40),
    "SwiGLU gate or up": (2048, 2048, 40),
    "SwiGLU gate and up in one product": (2048, 4096, 0),
    "SwiGLU down": (2048, 2048, 20),
    "LM head (vocabulary padded to 50264)": (2048, 50264, 1),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    ceiling = matmul_ceiling()  # FLOP/s
    rows = []
    with torch.no_grad():
        for name, (k, n, calls) in SHAPES.items():
            x, weight = torch.randn(TOKENS, k, **bf16), torch.randn(n, k, **bf16)
            ms = median_ms(lambda: F.linear(x, weight), reps=20, warmup=3)
            rows.append(dict(gemm=name, k=k, n=n, calls_per_step=calls, ms=ms,
                             tflops=2 * TOKENS * k * n / ms / 1e9))
            print(f"{name:45s} {k:5d} x {n:6d}: {ms:7.3f} ms, {rows[-1]['tflops']:5.0f} TFLOP/s", flush=True)
            del x, weight
    step_ms = sum(row["ms"] * row["calls_per_step"] for row in rows)
    print(f"ceiling {ceiling / 1e12:.0f} TFLOP/s; the step's GEMMs {step_ms:.1f} ms")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=TOKENS,
                  ceiling_tflops=ceiling / 1e12, step_gemm_ms=step_ms, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
