"""The memory-bound operations around a diffuapriel-1.3b block, unfused against the fused kernels the model uses
(`diffuapriel_hf.modeling.fused_ops`), at 64K tokens (bf16, hidden size 2048, Mamba inner size 4096, MLP size 2048),
timed in one process on one GPU:

- the direction sum `out0 + reverse_time(out1)` (a gather, then an add) against one kernel reading out1 mirrored;
- the direction sum, the residual add and the MLP's RMSNorm (three to four kernels, the residual stream read again
  by the norm) against one kernel writing the residual stream and its norm;
- the SwiGLU product `F.silu(gate) * up` on the halves of one gate-and-up product (two kernels) against one kernel;
  and its forward and backward, as in training (five kernels and the concatenation of the halves' gradients)
  against a kernel each way (`SwiGLUOfProduct`, the product's gradient written in one buffer);
- the residual add after a projection, `residual + F.linear(y, W)`, against cuBLAS adding it in the product's
  epilogue (`torch.addmm`): measured, and not used (it was slower).

Each fused form is checked against the unfused one before it is timed.

    python benchmarks/elementwise_fusion.py --out benchmarks/results/elementwise_fusion.json
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import median_ms, new_result, save  # benchmarks/harness.py, beside this script

TOKENS, HIDDEN, INNER, MLP = 65536, 2048, 4096, 2048


def relative_error(got, expected) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def compare(name, unfused, fused, tolerance) -> dict:
    expected, got = unfused(), fused()
    pairs = zip(got, expected) if isinstance(got, tuple) else [(got, expected)]
    error = max(relative_error(g, e) for g, e in pairs)
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
    from diffuapriel_hf.modeling import fused_ops
    from diffuapriel_hf.modeling.mamba_ops import reverse_time
    from diffuapriel_hf.modeling.modeling_diffuapriel import DiffuAprielRMSNorm

    result = new_result(tokens=TOKENS)
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    out0, out1, residual = (torch.randn(1, TOKENS, HIDDEN, **bf16) for _ in range(3))
    y = torch.randn(TOKENS, INNER, **bf16)
    out_proj = torch.randn(HIDDEN, INNER, **bf16) / INNER**0.5
    gate_up = torch.randn(TOKENS, 2 * MLP, **bf16)
    gate, up = gate_up.chunk(2, dim=-1)
    norm = DiffuAprielRMSNorm(HIDDEN, eps=1e-5).to(**bf16)

    def unfused_block_tail():
        hidden = residual + (out0 + reverse_time(out1))
        return hidden, norm(hidden)

    rows = []
    with torch.no_grad():
        rows.append(compare("direction sum out0 + reversed out1", lambda: out0 + reverse_time(out1),
                            lambda: fused_ops.add_time_reversed(out0, out1, use_kernel=True), 1e-6))
        rows.append(compare("direction sum + residual add + RMSNorm", unfused_block_tail,
                            lambda: fused_ops.add_rms_norm(residual, out0, norm, out1, use_kernel=True), 1e-2))
        rows.append(compare("SwiGLU product silu(gate) * up", lambda: F.silu(gate) * up,
                            lambda: fused_ops.swiglu_of_product(gate_up, use_kernel=True), 1e-2))
        flat_residual = residual[0]
        rows.append(compare("residual + out_proj(y) (addmm epilogue, not used)",
                            lambda: flat_residual + F.linear(y, out_proj),
                            lambda: torch.addmm(flat_residual, y, out_proj.t()), 1e-2))
    d_out = torch.randn(TOKENS, MLP, **bf16)

    def swiglu_training(function):  # the gradient of gate_up through one forward and backward
        leaf = gate_up.detach().requires_grad_(True)
        function(leaf).backward(d_out)
        return leaf.grad

    rows.append(compare("SwiGLU forward + backward (training)",
                        lambda: swiglu_training(lambda t: fused_ops.swiglu_reference(*t.chunk(2, dim=-1))),
                        lambda: swiglu_training(lambda t: fused_ops.swiglu_of_product(t, use_kernel=True)), 1e-2))
    result["rows"] = rows
    save(result, args.out)


if __name__ == "__main__":
    main()
