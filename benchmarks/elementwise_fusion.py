"""What fusing the memory-bound operations around a diffuapriel-1.3b block would save (issue 6's remaining 64K gap).

At 64K tokens (bf16, hidden size 2048, Mamba inner size 4096, MLP size 2048), each operation as the model runs it
now against a fused form, timed in one process on one GPU:

- the direction sum `out0 + reverse_time(out1)` (a gather, then an add) against one Triton kernel that reads out1
  mirrored;
- the residual add after a projection, `residual + F.linear(y, W)`, against cuBLAS adding it in the product's epilogue
  (`torch.addmm(residual, y, W.t())`);
- the SwiGLU product `F.silu(gate) * up` (two kernels) against one Triton kernel.

Each fused form is checked against the unfused one before it is timed. Nothing here is used by the model: the
results say which fusions are worth building.

    python benchmarks/elementwise_fusion.py --out benchmarks/results/elementwise_fusion.json
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from throughput import median_ms  # benchmarks/throughput.py, beside this script

TOKENS, HIDDEN, INNER, MLP = 65536, 2048, 4096, 2048
BLOCK = 4096


@triton.jit
def _add_reversed_kernel(a_ptr, b_ptr, out_ptr, rows, width, BLOCK: tl.constexpr):
    # out[r, c] = a[r, c] + b[rows - 1 - r, c] for (rows, width) row-major tensors.
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < rows * width
    row, column = offsets // width, offsets % width
    a = tl.load(a_ptr + offsets, mask=inside)
    b = tl.load(b_ptr + (rows - 1 - row) * width + column, mask=inside)
    tl.store(out_ptr + offsets, a + b, mask=inside)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=inside).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=inside).to(tl.float32)
    tl.store(out_ptr + offsets, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=inside)


def add_reversed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b reversed along dim 0, for contiguous (rows, width) tensors."""
    out = torch.empty_like(a)
    _add_reversed_kernel[(triton.cdiv(a.numel(), BLOCK),)](a, b, out, a.shape[0], a.shape[1], BLOCK=BLOCK)
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    _silu_mul_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK)
    return out


def compare(name, unfused, fused, tolerance) -> dict:
    expected, got = unfused(), fused()
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    if error > tolerance:
        raise AssertionError(f"{name}: fused form differs from the unfused one (relative error {error:.3g})")
    row = dict(operation=name, unfused_ms=median_ms(unfused, reps=30, warmup=3),
               fused_ms=median_ms(fused, reps=30, warmup=3), relative_error=error)
    print(f"{name}: unfused {row['unfused_ms']:.3f} ms, fused {row['fused_ms']:.3f} ms (error {error:.2g})", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from diffuapriel_hf.mamba_ops import reverse_time

    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    out0, out1, residual = (torch.randn(1, TOKENS, HIDDEN, **bf16) for _ in range(3))
    y = torch.randn(TOKENS, INNER, **bf16)
    out_proj = torch.randn(HIDDEN, INNER, **bf16) / INNER**0.5
    gate, up = torch.randn(TOKENS, MLP, **bf16), torch.randn(TOKENS, MLP, **bf16)
    rows = []
    with torch.no_grad():
        rows.append(compare("direction sum out0 + reversed out1", lambda: out0 + reverse_time(out1),
                            lambda: add_reversed(out0[0], out1[0]), 1e-6))
        flat_residual = residual[0]
        rows.append(compare("residual + out_proj(y)", lambda: flat_residual + F.linear(y, out_proj),
                            lambda: torch.addmm(flat_residual, y, out_proj.t()), 1e-2))
        rows.append(compare("SwiGLU product silu(gate) * up", lambda: F.silu(gate) * up, lambda: silu_mul(gate, up),
                            1e-2))
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=TOKENS, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
